"""Make a schedule: `python train.py [allocator=uniform|toca_like] [model=...] [num_steps=20]` (conf/train.yaml)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> dict:
    from diffsparse.tasks import make_schedule

    return make_schedule(cfg)


if __name__ == "__main__":
    main()

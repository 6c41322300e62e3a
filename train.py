"""Training entry point (Hydra): `python train.py` makes a schedule (conf/train.yaml);
`python train.py experiment=digits_stage1` learns one; `python train.py --config-name reference` trains the
reference DiT on the digits (conf/reference.yaml)."""

import hydra
from omegaconf import DictConfig

from diffsparse.tasks import TRAIN_TASKS


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> dict:
    return TRAIN_TASKS[cfg.get("task", "schedule")](cfg)


if __name__ == "__main__":
    main()

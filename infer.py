"""Cached inference: `python infer.py [schedule=PATH] [model=...] [sparsity=0.5] ...` (see conf/infer.yaml)."""

import hydra
from omegaconf import DictConfig

from diffsparse.tasks.infer import infer


@hydra.main(version_base="1.3", config_path="conf", config_name="infer")
def main(cfg: DictConfig) -> dict:
    return infer(cfg)


if __name__ == "__main__":
    main()

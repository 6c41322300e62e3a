"""`python train.py experiment=...` (task=learn): learn a schedule with DiffSparse under Lightning."""

from __future__ import annotations

import json
import logging
import resource
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from diffsparse.files import write_json
from diffsparse.learn.data import ConditionDataModule
from diffsparse.learn.module import ScheduleLearner
from diffsparse.tasks.common import check_complete

log = logging.getLogger(__name__)


def learn_schedule(cfg: DictConfig) -> dict:
    """Learn a schedule with `ScheduleLearner` under Lightning; export it (JSON, costs, heatmap) from rank 0."""
    check_complete(cfg)
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.output_dir)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    learner = ScheduleLearner(model=model, **OmegaConf.to_container(cfg.learn, resolve=True))
    data = ConditionDataModule(num_classes=learner._ref.num_classes, **cfg.data)
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    # keep the costs with the lowest validation L2 (the hard schedule, on held-out conditions), and the last ones
    best = ModelCheckpoint(dirpath=out / "checkpoints", filename="best-{epoch}", monitor="val/l2", mode="min")
    latest = ModelCheckpoint(dirpath=out / "checkpoints", filename="latest", enable_version_counter=False)
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer = L.Trainer(**trainer_args, logger=logger, default_root_dir=out, callbacks=[best, latest])
    start = time.perf_counter()
    try:
        trainer.fit(learner, data, ckpt_path=cfg.ckpt_path)
    except SIGTERMException as e:  # Lightning's is a SystemExit(None): exit status 0, as if it had finished
        resume = out / "checkpoints" / "latest.ckpt"
        hint = f" Resume with ckpt_path={resume}." if resume.is_file() else ""
        raise SystemExit(f"Training was stopped (SIGTERM) before it finished; no schedule was exported.{hint}") from e
    if trainer.interrupted:
        raise SystemExit("Training was interrupted before it finished; no schedule was exported.")
    minutes = (time.perf_counter() - start) / 60
    if not trainer.is_global_zero:
        return {}
    best_score = best.best_model_score
    if best.best_model_path:
        checkpoint = torch.load(best.best_model_path, weights_only=False)
        learner.load_state_dict(checkpoint["state_dict"])
        shutil.copy(best.best_model_path, out / f"stage{cfg.learn.stage}.ckpt")
        if best_score is None:  # spawned processes (ddp_spawn) hand back the path only: the score is in the file
            scores = [
                v["best_model_score"] for v in checkpoint.get("callbacks", {}).values() if "best_model_score" in v
            ]
            best_score = next((s for s in scores if s is not None), None)
    metrics = learner.export(out)
    metrics["best_val_l2"] = float(best_score) if best_score is not None else None
    metrics.update(minutes=round(minutes, 2), peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    write_json(out / "metrics.json", metrics)
    log.info("learned schedule: %s", json.dumps(metrics, default=str))
    return metrics

"""`python train.py experiment=...` (task=learn): learn a schedule with DiffSparse under Lightning."""

from __future__ import annotations

import json
import logging

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from diffsparse.learn.export import ScheduleExport
from diffsparse.models.loading import run_settings
from diffsparse.tasks.common import check_complete

log = logging.getLogger(__name__)


def with_model_settings(cfg: DictConfig) -> DictConfig:
    """`cfg` with the `learn` settings left null (sampler, steps, guidance, captions) set to the model's own
    (`diffsparse.models.loading.run_settings`); in place, and returned."""
    settings = run_settings(cfg.model)
    with open_dict(cfg):
        for key in ("sampler", "num_steps", "guidance", "captions"):
            if cfg.learn.get(key) is None:
                cfg.learn[key] = settings[key]
    return cfg


def learn_schedule(cfg: DictConfig) -> dict:
    """Fit the `learn` config's `ScheduleLearner` on the `data` config's conditions with the `trainer` config's
    Trainer and the `callbacks` group; the export callback writes the schedule and metrics.json from rank 0."""
    check_complete(cfg)
    if cfg.trainer.get("max_epochs") is not None and cfg.trainer.max_epochs < 1:
        raise ValueError(
            f"trainer.max_epochs={cfg.trainer.max_epochs}: nothing would be learned, and the untrained start would be "
            "exported as a learned schedule. Set trainer.max_epochs >= 1."
        )
    with_model_settings(cfg)
    L.seed_everything(cfg.seed, workers=True)
    # partial: the model and the objects below are passed as they are, not merged into the config
    learner = instantiate(cfg.learn, _partial_=True)(model=OmegaConf.to_container(cfg.model, resolve=True))
    data = instantiate(cfg.data, num_classes=learner.num_classes)
    callbacks = [instantiate(callback) for callback in cfg.callbacks.values()]
    export = next((c for c in callbacks if isinstance(c, ScheduleExport)), None)
    if export is None:
        raise ValueError("The learn task needs the export callback (callbacks=default, conf/callbacks/).")
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer = instantiate(cfg.trainer, _partial_=True)(callbacks=callbacks, logger=logger)
    try:
        trainer.fit(learner, data, ckpt_path=cfg.ckpt_path)
    except SIGTERMException as e:  # Lightning's is a SystemExit(None): exit status 0, as if it had finished
        last = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
        hint = f" Resume with ckpt_path={last}." if last else ""
        raise SystemExit(f"Training was stopped (SIGTERM) before it finished; no schedule was exported.{hint}") from e
    if trainer.interrupted:
        raise SystemExit("Training was interrupted before it finished; no schedule was exported.")
    if not trainer.is_global_zero:
        return {}
    metrics = json.loads(export.metrics_path.read_text())  # written by rank 0, in a spawned process under ddp_spawn
    log.info("learned schedule: %s", json.dumps(metrics, default=str))
    return metrics

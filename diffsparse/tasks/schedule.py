"""`python train.py` (task=schedule): export a hand-made schedule."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from diffsparse.backbones import example_inputs
from diffsparse.cache import cacheable_units
from diffsparse.models.handle import ModelHandle
from diffsparse.tasks.common import check_complete, load_configured_model

log = logging.getLogger(__name__)


def _mac_inputs(ref: ModelHandle) -> dict:
    """Forward keywords to count one step's MACs on: the handle's probe (a CFG pair), or random text embeddings
    for a text-conditional model whose empty prompt has not been encoded."""
    if ref.text_conditioned and ref.null_conditions is None:
        return example_inputs(ref.transformer, batch=2)
    return ref.probe_inputs()


def make_schedule(cfg: DictConfig) -> dict:
    """Build a schedule with the configured allocator, export it (JSON + heatmap PNG) and report its MACs."""
    check_complete(cfg)
    ref = load_configured_model(cfg)
    units = cacheable_units(ref.transformer)
    schedule = instantiate(cfg.allocator)(units=units, num_steps=cfg.num_steps)
    macs = schedule.macs(ref.transformer, **_mac_inputs(ref))
    out = Path(cfg.output_dir)
    path = schedule.save(out / "schedule.json")
    schedule.plot(out / "schedule.png")
    metrics = {
        "schedule": str(path),
        "mean_sparsity": schedule.mean_sparsity(),
        "mac_reduction": macs["reduction"],
        "full_steps": schedule.full_steps,
    }
    log.info("schedule written to %s: %s", path, json.dumps(metrics))
    return metrics

"""What `train.py` and `infer.py` run: instantiate from the Hydra config, run, return metrics."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .cache import cacheable_units
from .inference import resolve_schedule, run_inference
from .models import example_inputs

log = logging.getLogger(__name__)


def make_schedule(cfg: DictConfig) -> dict:
    """Build a schedule with the configured allocator, export it (JSON + heatmap PNG) and report its MACs."""
    pipe = instantiate(cfg.model)
    units = cacheable_units(pipe.transformer)
    schedule = instantiate(cfg.allocator)(units=units, num_steps=cfg.num_steps)
    out = Path(cfg.output_dir)
    path = schedule.save(out / "schedule.json")
    schedule.plot(out / "schedule.png")
    macs = schedule.macs(pipe.transformer, **example_inputs(pipe.transformer, batch=2))
    metrics = {
        "schedule": str(path),
        "mean_sparsity": schedule.mean_sparsity(),
        "mac_reduction": macs["reduction"],
        "full_steps": schedule.full_steps,
    }
    log.info("schedule written to %s: %s", path, json.dumps(metrics))
    return metrics


def infer(cfg: DictConfig) -> dict:
    """Load the model, apply the schedule, sample, and report MACs and the measured speed-up against dense."""
    pipe = instantiate(cfg.model)
    units = cacheable_units(pipe.transformer)
    schedule = resolve_schedule(cfg.schedule, units, cfg.num_steps, cfg.sparsity)
    conditions = OmegaConf.to_container(cfg.conditions, resolve=True)
    metrics = run_inference(
        pipe,
        schedule,
        conditions,
        selector=OmegaConf.to_container(cfg.selector) if isinstance(cfg.selector, DictConfig) else cfg.selector,
        seed=cfg.seed,
        rounds=cfg.rounds,
        guidance_scale=cfg.guidance_scale,
        output_dir=cfg.output_dir,
    )
    print(
        f"{schedule!r}\nMACs: dense {metrics['dense_gmacs']:.3f} G, cached {metrics['cached_gmacs']:.3f} G "
        f"({metrics['mac_reduction']:.2f}x fewer); measured speed-up {metrics['speedup']:.2f}x "
        f"(min {metrics['speedup_min']:.2f}, max {metrics['speedup_max']:.2f}, {cfg.rounds} rounds); "
        f"PSNR vs dense {metrics['psnr_vs_dense']:.2f} dB; samples (top: dense, bottom: cached): "
        f"{metrics.get('grid')}"
    )
    return metrics

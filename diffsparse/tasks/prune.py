"""`python train.py experiment=prune_*` (task=prune): calibrate, prune every stage, choose the stage levels, export.

The schedule of levels is `uniform` (one stage over all timesteps, one level), `mosaic` (MosaicDiff's three SNR
stages and allocation pattern) or `search` (Diff-ES: equal stages over the sampler's steps, levels found by a
search of `diffsparse.allocate.search` under a level-sum budget, fitness from `diffsparse.allocate.fitness` on the
routed model). Every one is fitted to `prune.budget` of the dense MACs. The artefact (`<output_dir>/pruned`) is what
`python infer.py pruned=...` and `python -m diffsparse.evaluate --pruned NAME=...` run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffsparse.allocate.fitness import SampleFitness
from diffsparse.allocate.search import make_search
from diffsparse.allocate.search_loop import plot_progress, run_search, search_options
from diffsparse.allocate.stages import StageSpace
from diffsparse.models.loading import load_model
from diffsparse.prune.calibration import step_boundaries
from diffsparse.prune.plan import (
    MOSAICDIFF_BOUNDARIES,
    PrunePlan,
    level_macs,
    mosaic_levels,
    saved_fraction,
    uniform_levels,
)
from diffsparse.prune.routing import apply_pruning, remove_pruning
from diffsparse.prune.store import METHODS, build_store
from diffsparse.prune.structures import prunable_layers
from diffsparse.tasks.common import check_complete

log = logging.getLogger(__name__)
SCHEDULES = ("uniform", "mosaic", "search")


def prune(cfg: DictConfig) -> dict:
    p = cfg.prune
    if p.schedule not in SCHEDULES:
        raise ValueError(f"Unknown prune.schedule {p.schedule!r}; choose one of {SCHEDULES}.")
    if p.method not in METHODS:
        raise ValueError(f"Unknown prune.method {p.method!r}; choose one of {METHODS}.")
    if not 0.0 < p.budget < 1.0:
        raise ValueError(f"prune.budget must be in (0, 1), got {p.budget}")
    for key in ("levels", "samples", "num_steps"):
        if p[key] < 1:
            raise ValueError(f"prune.{key} must be at least 1, got {p[key]}; set prune.{key}=1 or more.")
    if not p.damp > 0:
        raise ValueError(f"prune.damp must be positive, got {p.damp}; set e.g. prune.damp=0.01 (the default).")
    if p.schedule == "mosaic" and p.boundaries is not None and len(p.boundaries) != 2:
        raise ValueError(
            f"prune.boundaries must be exactly 2 train timesteps for prune.schedule=mosaic, got {list(p.boundaries)}; "
            "set e.g. prune.boundaries=[550,100] or prune.boundaries=null (MosaicDiff's)."
        )
    out = Path(cfg.output_dir)
    ref = load_model(OmegaConf.to_container(cfg.model, resolve=True))
    scheduler = ref.scheduler(p.sampler)
    scheduler.set_timesteps(p.num_steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    space = None
    if p.schedule == "uniform":
        boundaries = []
    elif p.schedule == "mosaic":
        boundaries = list(p.boundaries) if p.boundaries else list(MOSAICDIFF_BOUNDARIES)
    else:
        layers = tuple(layer.name for layer in prunable_layers(ref.transformer))
        space = StageSpace(layers, p.num_steps, p.stages, first_step_full=False)
        boundaries = step_boundaries(timesteps, space.stage_of_step())
    start = time.perf_counter()
    store = build_store(ref, p.method, boundaries, p.samples, p.levels, p.max_level, p.damp, cfg.seed)
    build_minutes = (time.perf_counter() - start) / 60
    macs = level_macs(ref.transformer, store, ref.probe_inputs())
    search_info = {}
    if p.schedule == "uniform":
        levels = uniform_levels(store, timesteps, macs, p.budget)
    elif p.schedule == "mosaic":
        levels = mosaic_levels(store, timesteps, macs, p.budget)
    else:
        levels, search_info = _search(cfg, ref, store, space, timesteps, macs, out)
    saved = saved_fraction(levels, boundaries, timesteps, macs)
    meta = {
        "schedule": p.schedule,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "sampler": p.sampler,
        "num_steps": p.num_steps,
        "timesteps": timesteps,
        "budget": p.budget,
        "saved_macs": saved,
        "level_gmacs": [m / 1e9 for m in macs],
        "calibration_minutes": store.info["calibration_minutes"],
        "pruning_minutes": store.info["pruning_minutes"],
        "build_minutes": build_minutes,
        **search_info,
    }
    plan = PrunePlan(store, levels, meta)
    directory = plan.save(out / "pruned")
    result = {"pruned": str(directory), "method": p.method, "schedule": p.schedule, "stage_levels": levels,
              "saved_macs": saved, "calibration_minutes": round(store.info["calibration_minutes"], 3),
              "pruning_minutes": round(store.info["pruning_minutes"], 3), **search_info}  # fmt: skip
    log.info("pruned: %s", json.dumps(result))
    if cfg.get("logger") and p.schedule != "search":  # the search logs every generation itself
        logger = instantiate(cfg.logger)
        logger.log_metrics({f"prune/{k}": v for k, v in result.items() if isinstance(v, float | int)}, step=0)
        logger.finalize("success")
    return result


def _search(cfg, ref, store, space, timesteps, macs, out: Path) -> tuple[list[int], dict]:
    """Diff-ES: levels per stage under the level sum whose even spread saves `prune.budget` of the MACs."""
    s, p = cfg.search, cfg.prune
    space = replace(space, levels=store.levels, max_level=store.max_level)

    def saved(x):
        return saved_fraction(x[:, 0], store.boundaries, timesteps, macs)

    total = space.budget_levels(saved, p.budget)
    model = ref.transformer
    with SampleFitness(ref, p.num_steps, s.fitness, s.samples, p.sampler, s.guidance, token_cache=False) as fitness:

        def fitness_of(x):
            apply_pruning(model, store, x[:, 0].tolist())
            try:
                return fitness.score()
            finally:
                remove_pruning(model)

        search = make_search(s.algorithm, space, total, fitness_of, seed=cfg.seed, **search_options(s))
        logger = instantiate(cfg.logger) if cfg.get("logger") else None
        minutes = run_search(search, s, out / "search_state.json", logger)
    levels, best = search.best
    plot_progress(search.evaluated, out / "search.png", f"{s.algorithm}: fitness ({s.fitness}) of every candidate")
    info = {"algorithm": s.algorithm, "fitness": s.fitness, "fitness_value": best, "level_sum": total,
            "generations": search.generation, "evaluated": len(search.evaluated),
            "search_minutes": minutes}  # fmt: skip
    return levels[:, 0].tolist(), info


def prune_model(cfg: DictConfig) -> dict:
    """`python train.py experiment=prune_*` (task=prune)."""
    check_complete(cfg)
    return prune(cfg)

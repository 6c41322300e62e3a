"""`python train.py experiment=search_*` (task=search): search a stage-wise schedule."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from diffsparse.allocate.fitness import SampleFitness
from diffsparse.allocate.search import make_search
from diffsparse.allocate.search_loop import plot_progress, run_search, search_options
from diffsparse.allocate.stages import StageSpace
from diffsparse.tasks.common import check_complete, load_configured_model

log = logging.getLogger(__name__)


def check_search_settings(s: DictConfig) -> None:
    """Refuse search settings that would fail deep inside the search or silently run nonsense, saying what to set."""
    for key in ("generations", "samples", "population", "survivors", "offspring"):
        if s[key] < 1:
            raise ValueError(f"search.{key} must be at least 1, got {s[key]}; set search.{key}=1 or more.")
    if s.minutes is not None and s.minutes <= 0:
        raise ValueError(
            f"search.minutes must be positive or null, got {s.minutes}; "
            "set search.minutes=null (no limit) or a positive number of minutes."
        )
    if not 0.0 < s.budget < 1.0:
        raise ValueError(
            f"search.budget must be in (0, 1), got {s.budget}; "
            "set search.budget to the fraction of the dense MACs to save, e.g. search.budget=0.5."
        )


def search_schedule(cfg: DictConfig) -> dict:
    """Search a stage-wise schedule (`diffsparse.allocate.search`) under a level budget fitted to `search.budget`
    of the MACs.

    Each generation is logged, and the search state is saved to `search_state.json`; a rerun into the same
    output_dir continues from it. Stops after `search.generations`, after `search.minutes` of wall clock (at a
    generation's end), or when the search has converged (greedy). Exports the best schedule like `learn`.
    """

    check_complete(cfg)
    check_search_settings(cfg.search)
    s = cfg.search
    out = Path(cfg.output_dir)
    ref = load_configured_model(cfg)
    scheduler = ref.scheduler(s.sampler)
    scheduler.set_timesteps(s.num_steps)
    table = ref.mac_table()
    dividers = tuple(s.dividers) if s.dividers else None
    space = StageSpace(tuple(table.units), s.num_steps, s.stages, s.levels, s.grouping, dividers)
    total = space.budget_levels(table, s.budget)
    options = search_options(s)
    logger = instantiate(cfg.logger) if cfg.get("logger") else None
    with SampleFitness(ref, s.num_steps, s.fitness, s.samples, s.sampler, s.guidance, s.selector) as fitness:
        search = make_search(s.algorithm, space, total, lambda x: fitness(space.expand(x)), seed=cfg.seed, **options)
        minutes = run_search(search, s, out / "search_state.json", logger)
    levels, best = search.best
    meta = {"algorithm": s.algorithm, "fitness": s.fitness, "fitness_value": best, "budget": s.budget}
    schedule = space.expand(levels, meta)
    saved = table.saved_fraction(schedule)
    schedule = type(schedule)(schedule.grid, schedule.units, {**schedule.meta, "saved_macs": saved})
    schedule.save(out / "schedule.json")
    schedule.plot(out / "schedule.png", title=f"{s.algorithm} search ({s.fitness}): saves {saved:.1%} of MACs")
    plot_progress(search.evaluated, out / "search.png", f"{s.algorithm}: fitness ({s.fitness}) of every candidate")
    result = {
        "schedule": str(out / "schedule.json"),
        "saved_macs": saved,
        "levels": levels.tolist(),
        "level_sum": total,
        "fitness": best,
        "generations": search.generation,
        "evaluated": len(search.evaluated),
        "minutes": round(minutes, 2),
    }
    log.info("searched schedule: %s", json.dumps(result))
    return result

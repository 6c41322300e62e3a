"""What `--budget` counts in the evaluation (`--budget-unit`), and the hand-made schedules fitted to it.

`macs` (default): a fraction of the dense MACs, every row fitted on MACs. `time`: a fraction of the dense time on
this device. The hand-made schedules (and `--learn`'s) are then fitted on a table of measured step times
(`cache.costs.measure_time_table`, at `--timing-samples` CFG pairs, the batch the speed-ups are timed at), measured
once per run and saved as OUT/time_table.json, or read from `--time-table`. Fewer steps, diffusers' caches and
cache-dit are still fitted on their measured MACs: their rows say so.
"""

from __future__ import annotations

import logging
from pathlib import Path

from diffsparse.allocate import baselines
from diffsparse.allocate.solver import InfeasibleBudget
from diffsparse.evaluate.cli import EvalConfig, UsageError
from diffsparse.evaluate.methods import SCHEDULE_METHODS
from diffsparse.schedule import Schedule

log = logging.getLogger(__name__)

TIME_TABLE = "time_table.json"


def budget_table(cfg: EvalConfig, runner):
    """The table the hand-made schedules are fitted on: the MAC table, or (`--budget-unit time`) the time table,
    measured (and saved) or loaded once per runner."""
    if cfg.budget_unit == "macs":
        return runner.ref.mac_table()
    if runner.time_table is None:
        if cfg.time_table is None:
            log.info("timing each unit's actions for --budget-unit time (%d CFG pairs)", cfg.timing_samples)
        try:
            table = runner.ref.budget_table("time", cfg.time_table, cfg.selector, cfg.timing_samples)
        except ValueError as e:
            raise UsageError(f"--time-table: {e}") from e
        if cfg.time_table is None:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            table.save(Path(cfg.output_dir) / TIME_TABLE)
        runner.time_table = table
    return runner.time_table


def fit_schedules(cfg: EvalConfig, runner) -> dict[str, Schedule]:
    """The hand-made schedules of `cfg.methods` fitted to `cfg.budget` (in `cfg.budget_unit`), by allocator name,
    without sampling anything: a budget they cannot meet is refused here (`UsageError`)."""
    families = [m for m in cfg.methods if m in SCHEDULE_METHODS]
    if not families:
        return {}
    scheduler = runner.ref.scheduler(cfg.sampler)
    scheduler.set_timesteps(cfg.steps)
    try:
        return baselines.budget_schedules(budget_table(cfg, runner), scheduler.timesteps.tolist(), cfg.budget)
    except InfeasibleBudget as e:
        raise UsageError(f"--budget {cfg.budget}, --steps {cfg.steps}: {e} The hand-made schedules {families} are "
                         "fitted to these; or leave them out of --methods.") from e  # fmt: skip

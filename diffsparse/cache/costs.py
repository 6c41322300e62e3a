"""Measuring what each action of each unit costs in time on this device: the `TimeTable` of a time budget.

Units that play the same role in every block (`transformer_blocks.*.attn1`) share a cost. For each role and each
action, a short trajectory (two full steps, so that forecasts have a history, then `steps` steps where that role
takes the action and every other unit copies all its tokens) is timed step by step with the project's stopwatch
(`diffsparse.clock`, synchronised on CUDA), in rounds that alternate all the configurations, and the median is
kept. A role's cost of an action is its step's time minus that of the all-copy step, per unit.

Costs are additive in the table, the model is not (a block that computes two units pays its norms once), and a
step that computes everything costs more inside a trajectory that reuses than in a dense one (7-16 % on the
reference model: memory no longer warm after a step that reused, and the forecast history it updates;
`bench/time-budget-digits/full_steps.py`). So the costs of actions that compute are scaled so that every unit
computing costs what such a step measured (timed right after a step where every unit forecasts), the all-copy
step is `other`, and the dense model's step is measured on its own (`dense_seconds`, what the budget is a
fraction of). The predicted speed-up of a schedule is reported beside the measured one.
"""

from __future__ import annotations

import re
import statistics

import numpy as np
import torch
from tqdm.auto import tqdm

from diffsparse.accounting.times import TimeTable
from diffsparse.backbones.registry import find_units
from diffsparse.cache.apply import apply_token_cache, remove_token_cache
from diffsparse.clock import Stopwatch
from diffsparse.levels import ACTIONS, SPARSITY_LEVELS, action_index
from diffsparse.schedule import Schedule

COPY_ALL = action_index(len(SPARSITY_LEVELS) - 1, False)
LEAD = 2  # full steps before the timed ones: a forecast extrapolates from two computations
FORECAST_ALL = action_index(len(SPARSITY_LEVELS) - 1, True)


def roles(names: list[str]) -> dict[str, list[int]]:
    """Unit indices by role: the name with its block number replaced by `*`."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(re.sub(r"\.\d+(?=\.|$)", ".*", name), []).append(i)
    return groups


def _row(num_units: int, units: list[int] = (), action: int = COPY_ALL) -> np.ndarray:
    """One step's actions: every unit copying all its tokens, except `units` taking `action`."""
    row = np.full(num_units, COPY_ALL, dtype=np.int64)
    row[list(units)] = action
    return row


def _step_times(model, kwargs: dict, schedule: Schedule, selector, device, every: int = 1) -> list[float]:
    """Seconds of every `every`-th step after the first `LEAD` of one trajectory of `schedule` (timesteps going
    down)."""
    apply_token_cache(model, schedule, selector=selector)
    times = []
    try:
        t0 = torch.as_tensor(kwargs["timestep"])
        for i in range(schedule.num_steps):
            step = dict(kwargs, timestep=(t0.double() * (1.0 - i / (schedule.num_steps + 1))).to(t0.dtype))
            with torch.no_grad(), Stopwatch(device) as clock:
                model(**step)
            if i >= LEAD and (i - LEAD) % every == 0:
                times.append(clock.seconds)
    finally:
        remove_token_cache(model)
    return times


def measure_time_table(
    model: torch.nn.Module, forward_kwargs: dict, selector=None, rounds: int = 3, steps: int = 4, progress=True
) -> TimeTable:
    """The `TimeTable` of `model` for the batch and tokens of `forward_kwargs` (one step's keywords), on the
    model's device and dtype, as described in the module docstring."""
    if rounds < 1 or steps < 1:
        raise ValueError(f"rounds={rounds}, steps={steps}: both must be at least 1.")
    names = [u.name for u in find_units(model)]
    groups = roles(names)
    dense = np.zeros(len(names), dtype=np.int64)
    rows = {"dense": dense, "copy": _row(len(names))}
    for role, members in groups.items():
        for a in range(len(ACTIONS)):
            if a != COPY_ALL:
                rows[(role, a)] = _row(len(names), members, a)
    schedules = {k: Schedule.from_actions(np.stack([dense] * LEAD + [r] * steps), names)
                 for k, r in rows.items()}  # fmt: skip
    # a step that computes everything inside a trajectory that reuses: after a step where every unit forecasts
    forecast_all = _row(len(names), range(len(names)), FORECAST_ALL)
    schedules["full"] = Schedule.from_actions(np.stack([dense] * LEAD + [dense, forecast_all] * steps), names)
    param = next(model.parameters())
    times: dict = {k: [] for k in schedules}
    bar = tqdm(total=(rounds + 1) * len(schedules), desc="timing actions", disable=not progress, leave=False)
    for r in range(rounds + 1):  # the first round warms up
        for key, schedule in schedules.items():
            every = 2 if key == "full" else 1
            measured = _step_times(model, forward_kwargs, schedule, selector, param.device, every)
            if r:
                times[key] += measured
            bar.update()
    bar.close()
    median = {k: statistics.median(v) for k, v in times.items()}
    seconds = np.zeros((len(names), len(ACTIONS)))
    for (role, a), t in ((k, v) for k, v in median.items() if isinstance(k, tuple)):
        seconds[groups[role], a] = max(t - median["copy"], 0.0) / len(groups[role])
    computes = np.array([level < 1.0 for level, _ in ACTIONS])
    predicted = seconds[:, 0].sum()
    scale = (median["full"] - median["copy"]) / predicted if predicted > 0 else 1.0
    if scale > 0:
        seconds[:, computes] *= scale
    hidden = forward_kwargs["hidden_states"]
    meta = {
        "device": str(param.device),
        "dtype": str(param.dtype).replace("torch.", ""),
        "batch": int(hidden.shape[0]),
        "input_shape": list(hidden.shape),
        "dense_step_measured": median["dense"],
        "full_step_measured": median["full"],
        "copy_step_measured": median["copy"],
        "compute_scale": scale,
        "rounds": rounds,
        "steps": steps,
        "threads": torch.get_num_threads(),
    }
    return TimeTable(tuple(names), seconds, median["copy"], meta, dense_seconds=median["dense"])

"""Refining a schedule by swapping neighbouring steps, judged by whole rollouts.

The DP and the straight-through gradient price each (step, unit, action) on its own; where along the trajectory
the full steps fall acts through the whole sequence (what a forecast extrapolates from, and where errors
compound), and the gradient of one rollout hardly sees it. On the reference model, moving one full step of
forecast-FORA (interval 2) by one step changed the validation L2 by -29 % to +152 % depending on the step, and
the learned costs had found none of the gains.

A move swaps the actions of steps t and t + 1 (t >= 1: the first step stays full). The MACs of a step's actions do
not depend on the step, so a swap keeps the schedule's saved MACs exactly and it stays within its budget. Moves
are tried in trajectory order; one is kept when the score (the L2 of the rollouts on the training conditions)
falls by at least `min_gain` of its current value. What is kept is then judged on the validation conditions by
the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from diffsparse.schedule import Schedule

# Conditions per rollout when refining (no gradients: more than a training batch)
REFINE_BATCH = 32


def swap_moves(actions: np.ndarray) -> list[int]:
    """The steps t (1 <= t < T - 1) whose actions differ from step t + 1's: swapping them changes the schedule."""
    return [t for t in range(1, len(actions) - 1) if not np.array_equal(actions[t], actions[t + 1])]


def refine_by_swaps(
    actions: np.ndarray,
    score: Callable[[np.ndarray], float],
    passes: int = 1,
    min_gain: float = 0.01,
    progress: bool = True,
) -> tuple[np.ndarray, dict]:
    """Greedy swaps of neighbouring steps' actions (T, U) that lower `score`; returns the refined actions and a
    report: the kept moves (t, t + 1), the score before and after, the number of rollouts scored."""
    if passes < 0 or not 0.0 <= min_gain < 1.0:
        raise ValueError(f"passes={passes}, min_gain={min_gain}: passes must be >= 0 and min_gain in [0, 1).")
    current = np.array(actions, copy=True)
    best = before = float(score(current))
    kept, scored = [], 1
    for p in range(passes):
        moves = swap_moves(current)
        kept_this_pass = 0
        for t in tqdm(moves, desc=f"refine pass {p + 1}/{passes}", disable=not progress, leave=False):
            candidate = current.copy()
            candidate[[t, t + 1]] = candidate[[t + 1, t]]
            value = float(score(candidate))
            scored += 1
            if value < best * (1.0 - min_gain):
                current, best = candidate, value
                kept.append((t, t + 1))
                kept_this_pass += 1
        if not kept_this_pass:
            break
    return current, {"moves": kept, "score_before": before, "score_after": best, "rollouts": scored}


def first_conditions(batches: Iterable[dict], size: int, batch_size: int = REFINE_BATCH) -> list[dict]:
    """The first `size` conditions of `batches` (dicts of tensors), re-batched by `batch_size`."""
    taken, count = [], 0
    for batch in batches:
        if count >= size:
            break
        taken.append({k: v[: size - count] for k, v in batch.items()})
        count += len(next(iter(taken[-1].values())))
    if not taken:
        raise ValueError("refining needs training conditions, and the data module gave none.")
    merged = {k: torch.cat([b[k] for b in taken]) for k in taken[0]}
    return [{k: v[i : i + batch_size] for k, v in merged.items()} for i in range(0, count, batch_size)]


def refine_schedule(
    validation_l2: Callable[[Schedule, list[dict]], float],
    schedule: Schedule,
    train_batches: Iterable[dict],
    val_batches: Iterable[dict],
    passes: int = 1,
    size: int = 64,
    val_l2: float | None = None,
    progress: bool = True,
) -> tuple[Schedule, dict]:
    """`schedule` refined by `refine_by_swaps`, scored by `validation_l2(schedule, batches)` (the L2 of its
    rollouts against the dense ones) on the first `size` training conditions. Returns the refined schedule if it
    validates better than `val_l2` (the schedule's validation L2, measured here when None), else `schedule`; and
    the report, with `conditions`, `val_l2_before`, `val_l2_after` and `kept`."""
    batches, val_batches = first_conditions(train_batches, size), list(val_batches)
    if val_l2 is None:
        val_l2 = validation_l2(schedule, val_batches)
    meta = dict(schedule.meta)

    def score(actions):
        return validation_l2(Schedule.from_actions(actions, schedule.units, meta), batches)

    actions, report = refine_by_swaps(schedule.action_indices(), score, passes=passes, progress=progress)
    refined = Schedule.from_actions(actions, schedule.units, {**meta, "refined_swaps": len(report["moves"])})
    refined_val = validation_l2(refined, val_batches) if report["moves"] else val_l2
    kept = refined_val < val_l2
    count = sum(len(next(iter(b.values()))) for b in batches)
    report.update(conditions=count, val_l2_before=val_l2, val_l2_after=refined_val, kept=kept)
    return (refined if kept else schedule), report

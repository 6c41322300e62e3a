"""Refining a schedule by swapping neighbouring steps, judged by whole rollouts.

The DP and the straight-through gradient price each (step, unit, action) on its own; where along the trajectory
the full steps fall acts through the whole sequence (what a forecast extrapolates from, and where errors
compound), and the gradient of one rollout hardly sees it. On the reference model at budget 0.5, moving one full
step of forecast-FORA (interval 2) by one step changed the validation L2 by -29 % to +298 % depending on the step
(`bench/refine-moves/`), while 4 epochs of gradient learning from that start validated no better than it.

A move swaps the actions of steps t and t + 1 (t >= 1: the first step stays full). The MACs of a step's actions do
not depend on the step, so a swap keeps the schedule's saved MACs exactly and it stays within its budget. A pass
tries, in trajectory order, the neighbouring pairs that differ when it begins (skipping those a kept swap has made
equal); a swap is kept when the score (the L2 of the rollouts on the training conditions) falls below
(1 - `min_gain`) times its current value. The schedule after each pass is then judged on the validation
conditions, and the best of them is kept if it validates better than the unrefined schedule: a pass whose swaps
fit the training conditions only is not exported.

A candidate acts as the current schedule before its swap, so with a learner that can pause and resume rollouts
(`Rollouts`) each batch's rollout of the current schedule is kept paused before the step being tried and only the
steps from there on are run for the candidate: about half the steps of whole rollouts over a pass, with the same
scores (the cache state is restored from a copy).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from diffsparse.schedule import Schedule

log = logging.getLogger(__name__)


def check_refine_settings(passes: int, size: int, batch: int) -> None:
    """Refuse refinement settings that cannot work, before anything is learned."""
    if passes < 0 or size < 1 or batch < 1:
        raise ValueError(
            f"learn.refine_passes={passes}, learn.refine_size={size}, learn.refine_batch={batch}: the passes must "
            "be >= 0 (0: no refinement), the conditions and the batch >= 1 (e.g. 1, 64 and 16)."
        )


def swap_moves(actions: np.ndarray) -> list[int]:
    """The steps t (1 <= t < T - 1) whose actions differ from step t + 1's: swapping them changes the schedule."""
    return [t for t in range(1, len(actions) - 1) if not np.array_equal(actions[t], actions[t + 1])]


def refine_by_swaps(
    actions: np.ndarray,
    score: Callable[[np.ndarray, float], float],
    passes: int = 1,
    min_gain: float = 0.01,
    progress: bool = True,
    on_keep: Callable[[np.ndarray], None] | None = None,
    on_pass: Callable[[np.ndarray, list], None] | None = None,
) -> tuple[np.ndarray, dict]:
    """Greedy swaps of neighbouring steps' actions (T, U) that lower `score`; returns the refined actions and a
    report: the kept moves (t, t + 1), the score before and after, the number of candidates scored.

    `score(actions, limit)` is the score, or any value >= `limit` once it is known to reach `limit` (a candidate
    scoring that much is not kept, so its exact score is not needed). `on_keep(actions)` hears of each kept
    candidate, the new current actions; `on_pass(actions, moves)` of the end of each pass that kept a move (the
    actions then, and the moves kept so far)."""
    if passes < 0 or not 0.0 <= min_gain < 1.0:
        raise ValueError(f"passes={passes}, min_gain={min_gain}: passes must be >= 0 and min_gain in [0, 1).")
    current = np.array(actions, copy=True)
    best = before = float(score(current, np.inf))
    kept, scored = [], 1
    for p in range(passes):
        moves = swap_moves(current)
        kept_this_pass = 0
        for t in tqdm(moves, desc=f"refine pass {p + 1}/{passes}", disable=not progress, leave=False):
            if np.array_equal(current[t], current[t + 1]):  # made equal by the swap kept just before
                continue
            candidate = current.copy()
            candidate[[t, t + 1]] = candidate[[t + 1, t]]
            value = float(score(candidate, best * (1.0 - min_gain)))
            scored += 1
            if value < best * (1.0 - min_gain):
                current, best = candidate, value
                kept.append((t, t + 1))
                if on_keep is not None:
                    on_keep(current)
                kept_this_pass += 1
        if not kept_this_pass:
            break
        if on_pass is not None:
            on_pass(current, list(kept))
    return current, {"moves": kept, "score_before": before, "score_after": best, "rollouts": scored}


def first_conditions(batches: Iterable[dict], size: int, batch_size: int) -> list[dict]:
    """The first `size` conditions of `batches` (dicts of batch-first tensors; all of them if fewer), re-batched
    by `batch_size`."""
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


class Rollouts(Protocol):
    """What a learner offers for scoring candidates from paused rollouts (`ScheduleLearner` does)."""

    def paused_rollout(self, schedule: Schedule, batch: dict, step: int, resume=None): ...

    def resumed_l2(self, schedule: Schedule, batch: dict, resume) -> float: ...


class PrefixScorer:
    """The mean L2 of a candidate's rollouts over `batches`, run on from each batch's rollout of the current
    schedule paused before the first step where the candidate differs from it.

    `keep(actions)` makes `actions` the current schedule; a pause stays valid as long as the current schedule acts
    as it did before the pause's step (a kept swap changes steps at or after it)."""

    def __init__(self, rollouts: Rollouts, actions: np.ndarray, units, meta: dict, batches: list[dict]):
        self.rollouts, self.units, self.meta, self.batches = rollouts, units, meta, batches
        self.current = np.array(actions, copy=True)
        self.pauses: list = [None] * len(batches)
        self.steps_run = 0  # denoising steps run, for the report

    def keep(self, actions: np.ndarray) -> None:
        self.current = np.array(actions, copy=True)

    def l2(self, actions: np.ndarray, index: int) -> float:
        """The candidate's L2 on batch `index`."""
        differs = [t for t in range(len(actions)) if not np.array_equal(actions[t], self.current[t])]
        first = differs[0] if differs else len(actions) - 1
        paused = self.pauses[index]
        # a pause is good while the current schedule acts as it did before its step (checked, not assumed)
        if paused is not None and not np.array_equal(self.current[: paused.step], paused.prefix):
            paused = None
        if paused is None or paused.step != first:
            resume = paused.state if paused is not None and paused.step < first else None
            current = Schedule.from_actions(self.current, self.units, self.meta)
            self.steps_run += first - (0 if resume is None else resume.step)
            state = self.rollouts.paused_rollout(current, self.batches[index], first, resume)
            paused = self.pauses[index] = _Pause(first, self.current[:first].copy(), state)
        self.steps_run += len(actions) - first
        candidate = Schedule.from_actions(actions, self.units, self.meta)
        return self.rollouts.resumed_l2(candidate, self.batches[index], paused.state)


@dataclass
class _Pause:
    step: int
    prefix: np.ndarray  # the actions of the steps before `step` the rollout ran
    state: object  # `sampling.Paused`


def refine_schedule(
    validation_l2: Callable[[Schedule, list[dict]], float],
    schedule: Schedule,
    train_batches: Iterable[dict],
    val_batches: Iterable[dict],
    passes: int = 1,
    size: int = 64,
    batch: int = 16,
    progress: bool = True,
    rollouts: Rollouts | None = None,
) -> tuple[Schedule, dict]:
    """`schedule` refined by `refine_by_swaps`, scored by `validation_l2(schedule, batches)` (the L2 of its
    rollouts against the dense ones) on at most `size` training conditions, `batch` per rollout; with `rollouts`,
    the same scores from paused rollouts (`PrefixScorer`). Returns, of the schedules after each pass, the one with the
    lowest validation L2 if that is below the unrefined one's (both measured here, on `val_batches`), else
    `schedule`; and the report, with `moves` (those of the returned schedule, or all tried when none is kept),
    `passes` (each pass's moves so far and validation L2), `conditions`, `rolled_out` (conditions rolled out in
    all, early stops included), `steps_run` (denoising steps run for the scores, summed over the batches; None
    without `rollouts`), `val_l2_before`, `val_l2_after` (the best pass's) and `kept`."""
    check_refine_settings(passes, size, batch)
    batches, val_batches = first_conditions(train_batches, size, batch), list(val_batches)
    sizes = [len(next(iter(b.values()))) for b in batches]
    count, rolled, meta = sum(sizes), [0], dict(schedule.meta)
    if count < size:
        log.warning("Refining on the %d training conditions there are (learn.refine_size=%d).", count, size)
    actions = schedule.action_indices()
    prefix = None if rollouts is None else PrefixScorer(rollouts, actions, schedule.units, meta, batches)

    def l2(candidate: np.ndarray, index: int) -> float:
        if prefix is not None:
            return prefix.l2(candidate, index)
        return validation_l2(Schedule.from_actions(candidate, schedule.units, meta), [batches[index]])

    def score(candidate, limit):
        """The mean L2 over the batches; stops early, at a lower bound >= `limit`, once the sum so far shows it
        (every term is >= 0), so a clearly worse candidate costs part of the rollouts."""
        total = 0.0
        for index, n in enumerate(sizes):
            total += l2(candidate, index) * n
            rolled[0] += n
            if total / count >= limit:
                break
        return total / count

    passes_seen = []  # after each pass that kept a move: (actions, moves so far, validation L2)

    def validate(actions: np.ndarray, moves: list) -> None:
        candidate = Schedule.from_actions(actions, schedule.units, meta)
        passes_seen.append((actions.copy(), moves, validation_l2(candidate, val_batches)))

    keep = None if prefix is None else prefix.keep
    _, report = refine_by_swaps(actions, score, passes=passes, progress=progress, on_keep=keep, on_pass=validate)
    before = validation_l2(schedule, val_batches) if passes_seen else None
    best = min(passes_seen, key=lambda seen: seen[2], default=None)
    kept = best is not None and best[2] < before
    refined = schedule
    if kept:
        refined = Schedule.from_actions(best[0], schedule.units, {**meta, "refined_swaps": len(best[1])})
    steps = None if prefix is None else prefix.steps_run
    report.update(
        moves=best[1] if kept else report["moves"], conditions=count, rolled_out=rolled[0], steps_run=steps,
        passes=[{"moves": m, "val_l2": v} for _, m, v in passes_seen], val_l2_before=before,
        val_l2_after=None if best is None else best[2], kept=kept,
    )  # fmt: skip
    return refined, report

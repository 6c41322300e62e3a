"""Refining a schedule by moving its steps' actions along the trajectory, judged by whole rollouts.

The DP and the straight-through gradient price each (step, unit, action) on its own; where along the trajectory
the full steps fall acts through the whole sequence (what a forecast extrapolates from, and where errors
compound), and the gradient of one rollout hardly sees it. On the reference model at budget 0.5, moving one full
step of forecast-FORA (interval 2) by one step changed the validation L2 by -29 % to +298 % depending on the step
(`bench/refine-moves/`), while 4 epochs of gradient learning from that start validated no better than it.

Two kinds of move, each at a step t >= 1 (the first step stays full):
- `swap`: the actions of steps t and t + 1 trade places;
- `shift`: the actions of steps t..T-1 rotate by one, later (the last step's action moves to t) or earlier (step
  t's moves to the end), so every later full step moves by one at once. A shift reaches in one move what takes
  many swaps, each of which must pay off on its own (`bench/learn-recipe/judge/phase-probe/`: interval 2 with
  its tail moved one step later beat interval 2 by 2.8 dB on the reference model).
A move permutes steps, and the MACs of a step's actions do not depend on the step, so it keeps the schedule's
saved MACs exactly and it stays within its budget. A pass scores every shift and keeps the best, then tries the
swaps in trajectory order (where neighbours differed when the pass began, and not where a kept swap has made them
equal); a move is kept when the score (the learner's judge of the rollouts on the training conditions: mean L2,
or mean per-sample log L2) falls below (1 - `min_gain`) times its current value. The schedule after each pass is
then judged on the validation conditions, and the best of them is kept if it validates better than the unrefined
schedule: a pass whose moves fit the training conditions only is not exported.

Every candidate is first screened on the first batch of training conditions: of a pass's shifts (about 2 T)
only the `SHIFT_FINALISTS` best are scored on all of them, and a swap only if it scores better there than the
current schedule (most swaps are not kept: they then cost one batch, not all). A shift that fits the training
conditions only moves the whole tail and decides which swaps follow, so the best shift is kept only if it also
validates better than the schedule it moves (on the FLUX digits model at 0.5 one validated 25 % worse).

A candidate acts as the current schedule before the move's step, so with a learner that can pause and resume
rollouts (`Rollouts`) each batch's rollout of the current schedule is kept paused before the step being tried and
only the steps from there on are run for the candidate: about half the steps of whole rollouts over a pass, with
the same scores (the cache state is restored from a copy).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from diffsparse.learn.losses import JUDGE_FLOORS, JUDGE_PARTS
from diffsparse.learn.moves import MOVES, shifted, swap_moves, swapped
from diffsparse.schedule import Schedule

log = logging.getLogger(__name__)


def _vector(values) -> np.ndarray:
    """A score or a vector of scores as a 1-d float array."""
    return np.atleast_1d(np.asarray(values, dtype=float))


def _plain(values: np.ndarray | None):
    """A vector of scores as the report gives it: a number for one, a list for several (None stays None)."""
    return None if values is None else float(values[0]) if len(values) == 1 else values.tolist()


SHIFT_FINALISTS = 4  # shifts scored on every training condition after screening on the first batch


def check_refine_settings(passes: int, size: int, batch: int, judge: str = "l2", moves=("swap",)) -> None:
    """Refuse refinement (and judging) settings that cannot work, before anything is learned."""
    if judge not in JUDGE_PARTS:
        raise ValueError(f"learn.judge={judge!r}: choose one of {tuple(JUDGE_PARTS)}.")
    if passes < 0 or size < 1 or batch < 1:
        raise ValueError(
            f"learn.refine_passes={passes}, learn.refine_size={size}, learn.refine_batch={batch}: the passes must "
            "be >= 0 (0: no refinement), the conditions and the batch >= 1 (e.g. 1, 64 and 16)."
        )
    if not moves or any(move not in MOVES for move in moves):
        raise ValueError(f"learn.refine_moves={list(moves)}: choose one or more of {list(MOVES)}.")


def refine_by_moves(
    actions: np.ndarray,
    score: Callable[[np.ndarray, float], float],
    passes: int = 1,
    min_gain: float = 0.01,
    progress: bool = True,
    on_keep: Callable[[np.ndarray], None] | None = None,
    on_pass: Callable[[np.ndarray, list], None] | None = None,
    in_db: bool = False,
    moves: tuple[str, ...] = ("swap",),
    screen: Callable[[np.ndarray], float] | None = None,
    finalists: int = SHIFT_FINALISTS,
    check: Callable[[np.ndarray, np.ndarray], bool] | None = None,
) -> tuple[np.ndarray, dict]:
    """Greedy moves (`MOVES`) of the steps' actions (T, U) that lower `score`; returns the refined actions and a
    report: the kept moves ((t, t + 1) for a swap, `shifted`'s records), the score before and after, the number of
    candidates scored.

    A pass first scores every shift and keeps the best (the lowest score, summed over a vector's parts), then tries
    the swaps in trajectory order, keeping each one that scores better. A shift's gain can hide a better one
    further on (moving the steps from 1 on gains a little where moving those from 11 on gains much, say), which
    is why the shifts are not kept as they are found; a swap acts locally. A schedule once scored is not scored
    again (the score to beat only falls).

    `score(actions, limit)` is the score, or any value >= `limit` once it is known to reach `limit` (a candidate
    scoring that much is not kept, so its exact score is not needed); a vector of scores (each lower is better) is
    kept only if every one of them falls. A candidate is kept when its score is below `limit`: (1 - `min_gain`)
    times the current score, or, `in_db`, the current score plus 10 log10(1 - `min_gain`) (scores in dB, where
    the same relative gain of an error is a fixed step). `on_keep(actions)` hears of each kept candidate, the new
    current actions; `on_pass(actions, moves)` of the end of each pass that kept a move (the actions then, and the
    moves kept so far).

    With `screen(actions)` (a cheaper score), only the `finalists` best shifts of a pass are scored, and a swap only
    if it screens lower than the current schedule (every part); with `check(candidate, current)`, the best shift
    is kept only if it returns True. The report lists the shifts `rejected` so, and counts those `screened`."""
    if passes < 0 or not 0.0 <= min_gain < 1.0:
        raise ValueError(f"passes={passes}, min_gain={min_gain}: passes must be >= 0 and min_gain in [0, 1).")

    def limit_of(best):
        return best + 10 * np.log10(1.0 - min_gain) if in_db else best * (1.0 - min_gain)

    current = np.array(actions, copy=True)
    best = before = _vector(score(current, np.inf))
    kept, rejected, scored, screened, seen = [], [], 1, 0, {current.tobytes()}
    screens = {}  # screen values by actions: the current schedule's is asked for at every swap

    def screened_value(candidate: np.ndarray) -> np.ndarray:
        if candidate.tobytes() not in screens:
            screens[candidate.tobytes()] = _vector(screen(candidate))
        return screens[candidate.tobytes()]

    def scored_below(candidate: np.ndarray, limit: np.ndarray) -> np.ndarray | None:
        """The candidate's scores if below `limit` (None if not, or if it was scored before)."""
        nonlocal scored
        if candidate.tobytes() in seen:
            return None
        seen.add(candidate.tobytes())
        scored += 1
        value = _vector(score(candidate, limit))
        return value if (value < limit).all() else None

    def keep(record, candidate, value) -> None:
        nonlocal current, best
        current, best = candidate, value
        kept.append(record)
        if on_keep is not None:
            on_keep(current)

    for p in range(passes):
        kept_before = len(kept)
        if "shift" in moves:
            found = None  # the best shift so far: (record, candidate, value)
            shifts = {}  # each distinct candidate once, under the first shift that makes it (equal actions repeat)
            for t in range(1, len(current) - 1):
                for record, candidate in shifted(current, t):
                    shifts.setdefault(candidate.tobytes(), (record, candidate))
            candidates = [c for c in shifts.values() if c[1].tobytes() not in seen]
            if screen is not None and len(candidates) > finalists:
                bar = tqdm(candidates, desc=f"screening, pass {p + 1}/{passes}", disable=not progress, leave=False)
                ranks = [float(screened_value(candidate).sum()) for _, candidate in bar]
                screened += len(candidates)
                best_few = sorted(np.argsort(ranks, kind="stable")[:finalists])  # in trajectory order, as found
                candidates = [candidates[i] for i in best_few]
            bar = tqdm(candidates, desc=f"shifts, pass {p + 1}/{passes}", disable=not progress, leave=False)
            for record, candidate in bar:
                limit = limit_of(best)
                if found is not None and len(best) == 1:  # one score: beating the best shift so far is enough
                    limit = np.minimum(limit, found[2])
                value = scored_below(candidate, limit)
                if value is not None and (found is None or value.sum() < found[2].sum()):
                    found = (record, candidate, value)
            if found is not None and (check is None or check(found[1], current)):
                keep(*found)
            elif found is not None:
                rejected.append(found[0])
        if "swap" in moves:
            swaps = swap_moves(current)
            for t in tqdm(swaps, desc=f"swaps, pass {p + 1}/{passes}", disable=not progress, leave=False):
                if np.array_equal(current[t], current[t + 1]):  # made equal by the swap kept just before
                    continue
                candidate = swapped(current, t)
                if screen is not None and candidate.tobytes() not in seen:
                    screened += 1
                    if (screened_value(candidate) >= screened_value(current)).any():
                        continue  # no better on the screen: not scored
                value = scored_below(candidate, limit_of(best))
                if value is not None:
                    keep((t, t + 1), candidate, value)
        if len(kept) == kept_before:
            break
        if on_pass is not None:
            on_pass(current, list(kept))
    report = {"moves": kept, "score_before": _plain(before), "score_after": _plain(best), "rollouts": scored,
              "screened": screened, "rejected": rejected}  # fmt: skip
    return current, report


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

    def resumed_scores(self, schedule: Schedule, batch: dict, resume) -> np.ndarray: ...


class PrefixScorer:
    """The score (the learner's judge) of a candidate's rollouts over `batches`, run on from each batch's rollout of
    the current schedule paused before the first step where the candidate differs from it.

    `keep(actions)` makes `actions` the current schedule; a pause stays valid as long as the current schedule acts
    as it did before the pause's step (a kept swap changes steps at or after it)."""

    def __init__(self, rollouts: Rollouts, actions: np.ndarray, units, meta: dict, batches: list[dict]):
        self.rollouts, self.units, self.meta, self.batches = rollouts, units, meta, batches
        self.current = np.array(actions, copy=True)
        self.pauses: list = [None] * len(batches)
        self.steps_run = 0  # denoising steps run, for the report

    def keep(self, actions: np.ndarray) -> None:
        self.current = np.array(actions, copy=True)

    def score(self, actions: np.ndarray, index: int) -> np.ndarray:
        """The candidate's scores on batch `index`."""
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
        return self.rollouts.resumed_scores(candidate, self.batches[index], paused.state)


@dataclass
class _Pause:
    step: int
    prefix: np.ndarray  # the actions of the steps before `step` the rollout ran
    state: object  # `sampling.Paused`


def refine_schedule(
    validation_scores: Callable[[Schedule, list[dict]], np.ndarray | float],
    schedule: Schedule,
    train_batches: Iterable[dict],
    val_batches: Iterable[dict],
    passes: int = 1,
    size: int = 64,
    batch: int = 16,
    progress: bool = True,
    rollouts: Rollouts | None = None,
    parts: tuple[str, ...] = ("l2",),
    moves: tuple[str, ...] = ("swap",),
    screen: bool = True,
) -> tuple[Schedule, dict]:
    """`schedule` refined by `refine_by_moves` (of `moves`: `MOVES`), scored by `validation_scores(schedule,
    batches)`: the mean errors of its rollouts against the dense ones, one per judge in `parts`
    (`losses.JUDGE_PARTS`: `l2`, `log_l2` or both), compared in dB, so a move is kept when every one of them falls
    by 1 % of the error. Scored on at most `size`
    training conditions, `batch` per rollout; with `rollouts`, the same scores from paused rollouts
    (`PrefixScorer`). With `screen` (and more than one batch), candidates are screened on the first batch
    (`refine_by_moves`); the best shift is kept only if it validates better than the schedule it moves. Returns, of
    the schedules after each pass that validate better than the unrefined one under
    every part (both measured here, on `val_batches`), the one that gains most (summed in dB), else `schedule`; and
    the report, with `moves` (those of the returned schedule, or all tried when none is kept), `passes` (each pass's
    moves so far and validation scores, `val`), `conditions`, `rolled_out` (conditions rolled out in all, early
    stops included), `steps_run` (denoising steps run for the scores, summed over the batches; None without
    `rollouts`), `val_before`, `val_after` (the kept pass's, else the closest one's) and `kept`. Scores in the report
    are the judges' own (mean L2, mean log L2 in dB): a number for one part, a list for several."""
    check_refine_settings(passes, size, batch, moves=moves)
    batches, val_batches = first_conditions(train_batches, size, batch), list(val_batches)
    sizes = [len(next(iter(b.values()))) for b in batches]
    count, rolled, meta = sum(sizes), [0], dict(schedule.meta)
    if count < size:
        log.warning("Refining on the %d training conditions there are (learn.refine_size=%d).", count, size)
    actions = schedule.action_indices()
    prefix = None if rollouts is None else PrefixScorer(rollouts, actions, schedule.units, meta, batches)
    floors = np.array([JUDGE_FLOORS[part] for part in parts])
    is_l2 = np.array([part == "l2" for part in parts])

    def in_db(values: np.ndarray) -> np.ndarray:
        return np.where(is_l2, 10 * np.log10(np.maximum(values, 1e-30)), values)

    first = {}  # the first batch's scores by actions: the screen's, and the full score's first part

    def as_schedule(candidate: np.ndarray) -> Schedule:
        return Schedule.from_actions(candidate, schedule.units, meta)

    def batch_scores(candidate: np.ndarray, index: int) -> np.ndarray:
        if index == 0 and candidate.tobytes() in first:
            return first[candidate.tobytes()]
        rolled[0] += sizes[index]
        if prefix is not None:
            value = _vector(prefix.score(candidate, index))
        else:
            value = _vector(validation_scores(as_schedule(candidate), [batches[index]]))
        if index == 0:
            first[candidate.tobytes()] = value
        return value

    def score(candidate, limit):
        """The mean scores over the batches, in dB; stops early, at lower bounds one of which is >= its `limit`,
        once the sums so far show it (every later condition scores at least its part's floor), so a clearly worse
        candidate costs part of the rollouts."""
        total, left = np.zeros(len(parts)), count
        for index, n in enumerate(sizes):
            total += batch_scores(candidate, index) * n
            left -= n
            bound = in_db((total + left * floors) / count if left else total / count)
            if (bound >= limit).any():
                return bound
        return in_db(total / count)

    passes_seen = []  # after each pass that kept a move: (actions, moves so far, validation scores)
    validated = {}  # validation scores by actions, each schedule validated once

    def val_of(candidate: np.ndarray) -> np.ndarray:
        if candidate.tobytes() not in validated:
            validated[candidate.tobytes()] = _vector(validation_scores(as_schedule(candidate), val_batches))
        return validated[candidate.tobytes()]

    def validate(actions: np.ndarray, moves: list) -> None:
        passes_seen.append((actions.copy(), moves, val_of(actions)))

    def validates_better(candidate: np.ndarray, current: np.ndarray) -> bool:
        return bool((in_db(val_of(candidate)) < in_db(val_of(current))).all())

    def screened(candidate: np.ndarray) -> np.ndarray:
        return in_db(batch_scores(candidate, 0))

    keep = None if prefix is None else prefix.keep
    screening = {"screen": screened} if screen and len(batches) > 1 else {}
    _, report = refine_by_moves(actions, score, passes=passes, progress=progress, on_keep=keep, on_pass=validate,
                                in_db=True, moves=tuple(moves), check=validates_better, **screening)  # fmt: skip
    before = val_of(actions) if passes_seen or report["rejected"] else None
    better = [seen for seen in passes_seen if (in_db(seen[2]) < in_db(before)).all()]
    best = max(better, key=lambda seen: float((in_db(before) - in_db(seen[2])).sum()), default=None)
    kept = best is not None
    refined = schedule
    if kept:
        refined = Schedule.from_actions(best[0], schedule.units, {**meta, "refined_moves": len(best[1])})
    steps = None if prefix is None else prefix.steps_run
    shown = best or min(passes_seen, key=lambda seen: float(in_db(seen[2]).sum()), default=None)

    report.update(
        moves=best[1] if kept else report["moves"], conditions=count, rolled_out=rolled[0], steps_run=steps,
        passes=[{"moves": m, "val": _plain(v)} for _, m, v in passes_seen], val_before=_plain(before),
        val_after=None if shown is None else _plain(shown[2]), kept=kept, parts=list(parts),
    )  # fmt: skip
    report.update(score_before=_undo_db(report["score_before"], parts),
                  score_after=_undo_db(report["score_after"], parts))  # fmt: skip
    return refined, report


def _undo_db(values, parts: tuple[str, ...]):
    """Scores from dB back to the judges' own units (mean L2; mean log L2 stays in dB)."""
    return _plain(
        np.array([10 ** (v / 10) if part == "l2" else v for v, part in zip(_vector(values), parts, strict=True)])
    )

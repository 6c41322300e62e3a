"""Stage-wise schedules: a few integer levels (per stage, optionally per unit group) expanded to a full `Schedule`.

This is the search space of Diff-ES and MosaicDiff (`shared/papers/diff-es.md` section 3.1): the trajectory is cut
into `K` contiguous stages and each stage gets a sparsity level `l` in `0..levels`, meaning sparsity
`l / levels`. The global budget is the sum of the levels (Diff-ES's constraint, which its level-switch mutation
keeps exact); `StageSpace.budget_levels` picks the sum whose even spread saves a given MAC fraction.

A level is the stage's mean sparsity over all its steps. Step 0 always computes everything (the cache starts
empty), so the rest of the first stage makes up for it, and that stage's levels stop at what its other steps can
reach (`upper`). With stages of equal length (the default when the step count allows), equal level sums then
mean nearly equal MACs, wherever the levels sit. Token caching has five sparsities per unit (`SPARSITY_LEVELS`):
a stage's sparsity between two of them alternates the two over the stage's steps, spread evenly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from diffsparse.accounting.macs import MacTable
from diffsparse.allocate.baselines import alternated_levels
from diffsparse.allocate.units import unit_kinds, unit_places
from diffsparse.schedule import Schedule

GROUPINGS = ("all", "kind", "half")


def unit_groups(units: Sequence[str], grouping: str) -> tuple[list[str], np.ndarray]:
    """(group names, group index of every unit) for a grouping: `all` (one group), `kind` (one group per unit kind
    of the backbone registry: self-attention, cross-attention, MLP; FLUX: joint attention, MLP, single-stream
    block) or `half` (first and second half of the blocks, over all block lists)."""
    if grouping == "all":
        return ["all"], np.zeros(len(units), dtype=np.int64)
    if grouping == "kind":
        kinds = unit_kinds(units)
        names = sorted(set(kinds), key=kinds.index)
        return names, np.array([names.index(k) for k in kinds])
    if grouping == "half":
        blocks = [p.block for p in unit_places(units)]
        cut = (max(blocks) + 1) / 2
        return ["first half", "second half"], np.array([int(b >= cut) for b in blocks])
    raise ValueError(f"Unknown unit grouping {grouping!r}; choose one of {GROUPINGS}.")


@dataclass(frozen=True)
class StageSpace:
    """Stage-wise schedules for one model (its units) and step count.

    Args:
        units: the model's cacheable units, as in a `Schedule`.
        num_steps: denoising steps.
        num_stages: K contiguous stages.
        levels: a level l means sparsity l / levels (Diff-ES uses 16 for OBS and Wanda).
        grouping: levels per stage only (`all`), or per stage and unit group (`kind`, `half`).
        dividers: first step of each stage after the first (K - 1 increasing steps); default: equal lengths.
        max_level: the highest level of any cell (default `levels`).
        first_step_full: step 0 computes everything (token caching), so the first stage's levels stop lower; False
            for schedules without that rule (structural pruning).
    """

    units: tuple[str, ...]
    num_steps: int
    num_stages: int = 10
    levels: int = 16
    grouping: str = "all"
    dividers: tuple[int, ...] | None = None
    max_level: int | None = None
    first_step_full: bool = True

    def __post_init__(self):
        if not 1 <= self.num_stages <= self.num_steps:
            raise ValueError(f"num_stages must be in 1..{self.num_steps}, got {self.num_stages}")
        if self.levels < 1:
            raise ValueError(f"levels must be >= 1, got {self.levels}")
        if self.max_level is not None and not 1 <= self.max_level <= self.levels:
            raise ValueError(f"max_level must be in 1..{self.levels}, got {self.max_level}")
        if self.dividers is not None:
            d = list(self.dividers)
            if len(d) != self.num_stages - 1 or d != sorted(set(d)) or (d and not 0 < d[0] <= d[-1] < self.num_steps):
                raise ValueError(
                    f"dividers must be {self.num_stages - 1} increasing steps in 1..{self.num_steps - 1}, got {d}"
                )
        unit_groups(self.units, self.grouping)  # checks the grouping

    @property
    def shape(self) -> tuple[int, int]:
        """(stages, groups): the shape of an individual."""
        return self.num_stages, len(unit_groups(self.units, self.grouping)[0])

    def stage_of_step(self) -> np.ndarray:
        if self.dividers is not None:
            return np.searchsorted(np.asarray(self.dividers), np.arange(self.num_steps), side="right")
        return np.arange(self.num_steps) * self.num_stages // self.num_steps

    def upper(self) -> np.ndarray:
        """The highest level of each cell (stages x groups): `max_level`, less in the stage holding step 0 when that
        step is always full."""
        stage = self.stage_of_step()
        k, g = self.shape
        top = self.levels if self.max_level is None else self.max_level
        bound = np.full((k, g), top, dtype=np.int64)
        if self.first_step_full:
            n = int((stage == stage[0]).sum())
            bound[stage[0]] = min(top, self.levels * (n - 1) // n)
        return bound

    def max_sum(self) -> int:
        return int(self.upper().sum())

    def budget_levels(self, table: MacTable | Callable[[np.ndarray], float], budget: float) -> int:
        """The smallest level sum whose even spread (`even`) saves at least `budget` of the dense MACs.

        `table`: the token cache's `MacTable`, or any function giving the saved MAC fraction of an individual.
        """
        saved = table if callable(table) else (lambda x: table.saved_fraction(self.expand(x)))
        low, high = 0, self.max_sum()
        if saved(self.even(high)) < budget:
            raise ValueError(f"No stage-wise schedule saves {budget:.0%} of the MACs: the budget is too high.")
        while low < high:
            mid = (low + high) // 2
            if saved(self.even(mid)) >= budget:
                high = mid
            else:
                low = mid + 1
        return low

    def even(self, total: int) -> np.ndarray:
        """The individual with level sum `total` spread as evenly as possible (remainder to the later cells)."""
        if not 0 <= total <= self.max_sum():
            raise ValueError(f"level sum must be in 0..{self.max_sum()}, got {total}")
        upper = self.upper().reshape(-1)
        flat = np.zeros_like(upper)
        while flat.sum() < total:  # one level at a time to the cells with the fewest, later cells first
            room = np.flatnonzero(flat < upper)
            flat[room[::-1][np.argmin(flat[room][::-1])]] += 1
        return flat.reshape(self.shape)

    def check(self, individual: np.ndarray, total: int | None = None) -> None:
        """Raise unless `individual` has the space's shape, levels in range and (if given) level sum `total`."""
        x = np.asarray(individual)
        if x.shape != self.shape or x.min() < 0 or (x > self.upper()).any():
            raise ValueError(f"individual {x.tolist()} is not in {self} (levels 0..{self.upper().tolist()})")
        if total is not None and int(x.sum()) != total:
            raise ValueError(f"individual has level sum {int(x.sum())}, the budget is {total}")

    def expand(self, individual: np.ndarray, meta: dict | None = None) -> Schedule:
        """The full `Schedule` of an individual (stages x groups integer levels)."""
        x = np.asarray(individual)
        self.check(x)
        _, group = unit_groups(self.units, self.grouping)
        stage = self.stage_of_step()
        grid = np.zeros((self.num_steps, len(self.units)))
        for k in range(self.num_stages):
            length = int((stage == k).sum())
            steps = np.flatnonzero((stage == k) & (np.arange(self.num_steps) > 0))
            for g in range(x.shape[1]):
                sparsity = min(x[k, g] / self.levels * length / max(len(steps), 1), 1.0)  # step 0 makes up for
                grid[np.ix_(steps, group == g)] = alternated_levels(sparsity, len(steps), centred=True)[:, None]
        info = {"method": "stagewise", "levels": x.tolist(), "level_scale": self.levels, "grouping": self.grouping}
        return Schedule(grid, self.units, {**info, **(meta or {})})

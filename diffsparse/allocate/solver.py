"""The exact dynamic program that turns a cost matrix and a budget into a schedule (DiffSparse eq. 6-7).

Items are the (step, unit) pairs after the first step; each picks one level j of S at cost `C[i, j]` and saves
an integer amount `w[i, j]`. The program minimises the summed cost while the summed saving reaches the budget B:

    F_i(r) = min_j F_{i-1}(r') + C[i, j]  over r' with min(r' + w[i, j], B) = r,   r in 0..B,

then back-tracks the choices. O(items x B x |S|) time and about items x B bytes for the back-pointers. Numpy in
and out, no torch; the kernel is jitted with numba.

Budgets in MACs are discretised into quanta: savings are rounded down and the budget up, so a solution of the
discrete problem always saves at least the budget in real MACs. Where the units' savings share a common divisor
that splits the largest possible saving into at most twice `resolution` quanta (transformer sizes are multiples
of large powers of two), that divisor is the quantum and no saving is rounded; otherwise the largest saving is
split into `resolution` quanta (rounding a unit's saving down by less than one quantum).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from diffsparse.accounting.macs import MacTable
from diffsparse.levels import ACTION_LEVELS, ACTIONS, SPARSITY_LEVELS

RESOLUTION = 8192  # MAC quanta the largest possible saving is split into (`solve_schedule`) when not exact


class InfeasibleBudget(ValueError):
    """No choice of levels reaches the budget."""


@numba.njit(cache=True)
def _dp(costs, savings, budget, exact):
    """Choices (items,) minimising sum costs[i, c_i] with sum savings[i, c_i] >= budget (== budget if exact);
    all -1 when infeasible."""
    items, levels = costs.shape
    inf = np.inf
    best = np.full(budget + 1, inf)
    best[0] = 0.0
    nxt = np.empty(budget + 1)
    choice = np.zeros((items, budget + 1), dtype=np.int8)
    came_to_top = np.zeros(items, dtype=np.int64)  # predecessor of state `budget`, which also collects overflow
    for i in range(items):
        nxt[:] = inf
        for r in range(budget + 1):
            base = best[r]
            if base == inf:
                continue
            for j in range(levels):
                s = r + savings[i, j]
                if s > budget:
                    if exact:
                        continue
                    s = budget
                c = base + costs[i, j]
                if c < nxt[s]:
                    nxt[s] = c
                    choice[i, s] = j
                    if s == budget:
                        came_to_top[i] = r
        best, nxt = nxt, best
    picked = np.full(items, -1, dtype=np.int64)
    if best[budget] == inf:
        return picked
    s = budget
    for i in range(items - 1, -1, -1):
        j = choice[i, s]
        picked[i] = j
        s = came_to_top[i] if s == budget else s - savings[i, j]
    return picked


def solve(costs: np.ndarray, savings: np.ndarray, budget: int, exact: bool = False) -> np.ndarray:
    """The exact DP: one column per row of `costs` (items x levels) so that the integer `savings` of the chosen
    columns sum to at least `budget` (exactly `budget` with `exact=True`) at the least summed cost."""
    costs = np.ascontiguousarray(costs, dtype=np.float64)
    savings = np.ascontiguousarray(savings, dtype=np.int64)
    if costs.shape != savings.shape or costs.ndim != 2:
        raise ValueError(f"costs {costs.shape} and savings {savings.shape} must be the same (items, levels) shape")
    if (savings < 0).any():
        raise ValueError("savings must be non-negative")
    if not np.isfinite(costs).all():
        raise ValueError("costs must be finite")
    budget = int(budget)
    most = int(savings.max(axis=1).sum())
    if budget > most:
        raise InfeasibleBudget(f"the budget ({budget}) exceeds the largest possible saving ({most})")
    picked = _dp(costs, savings, max(budget, 0), exact)
    if len(picked) and picked[0] < 0:
        raise InfeasibleBudget(f"no choice saves exactly {budget}" if exact else f"no choice reaches {budget}")
    return picked


def solve_schedule(costs: np.ndarray, budget: float, table: MacTable | None = None, resolution: int = RESOLUTION):
    """Level indices (T, U) for a cost tensor (T, U, |S|), or action indices for a cost tensor over all actions
    (T, U, |A|) (`levels.ACTIONS`: a level with copy or forecast, which saves what its level saves): row 0 all
    zeros, the rest chosen by the DP.

    Args:
        costs: cost of each level or action for each (step, unit); row 0 is ignored (the first step computes
            everything).
        budget: the fraction to save. With a `MacTable` it is a fraction of the dense trajectory's MACs (units
            differ in cost; our default), with a measured `TimeTable` of its predicted time (per action: a forecast
            costs more than a copy); without, the paper's plain average sparsity over all T x U.
        resolution: number of MAC quanta the largest possible saving is split into.
    """
    costs = np.asarray(costs, dtype=np.float64)
    steps, units, levels = costs.shape
    if levels not in (len(SPARSITY_LEVELS), len(ACTIONS)):
        raise ValueError(
            f"costs need {len(SPARSITY_LEVELS)} levels or {len(ACTIONS)} actions in the last axis, got {levels}"
        )
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget must be in [0, 1], got {budget}")
    if table is not None and len(table.units) != units:
        raise ValueError(f"costs have {units} units, the MAC table {len(table.units)}")
    check_budget(budget, steps, table, units, resolution=resolution)
    items = costs[1:].reshape(-1, levels)
    savings, target, _ = _discretised(budget, steps, table, units, resolution, actions=levels == len(ACTIONS))
    if table is not None:
        # A measured action slower than computing everything (a partial step's overheads) saves nothing: make it
        # dearer than computing everything, which saves the same, so that it is never chosen.
        cost = np.asarray(table.action_costs if levels == len(ACTIONS) else table.level_costs)
        slower = np.tile(cost > cost[:, :1], (steps - 1, 1))
        items = np.where(slower, np.maximum(items, items[:, :1]) + 1.0, items)
    if levels == len(ACTIONS) and table is None:
        savings = savings[:, list(ACTION_LEVELS)]
    picked = solve(items, savings, target)
    return np.concatenate([np.zeros((1, units), dtype=np.int64), picked.reshape(steps - 1, units)])


def _discretised(budget: float, steps: int, table: MacTable | None, units: int, resolution: int, actions=False):
    """The DP's integer problem for a schedule of `steps` x `units`: each item's savings (one row per (step, unit)
    after the first step; per action with `actions` and a table), the integer target for `budget`, and the number
    of integer units per budget fraction. The table is a `MacTable` or a measured `TimeTable`."""
    levels = len(SPARSITY_LEVELS)
    items = (steps - 1) * units
    if table is None:
        # plain sparsity: level j saves j quarters of a unit; the budget counts every (t, u), the first row too
        savings = np.tile(np.arange(levels, dtype=np.int64), (items, 1))
        target = math.ceil(budget * (levels - 1) * steps * units - 1e-9)
        return savings, target, float((levels - 1) * steps * units)
    cost = np.asarray(table.action_costs if actions else table.level_costs)
    saved = np.maximum(cost[:, :1] - cost, 0)  # a measured action may cost more than computing everything
    dense_total = float(table.dense_step) * steps
    most = float(saved.max(axis=1).sum()) * (steps - 1)
    exact = np.issubdtype(saved.dtype, np.integer) and (saved > 0).any()
    divisor = int(np.gcd.reduce(saved[saved > 0])) if exact else 0
    if divisor > 0 and most / divisor <= 2 * resolution:  # exact, at a bounded cost (time and back-pointers)
        quantum = float(divisor)
    else:
        quantum = max(most / resolution, 1e-12)
    savings = np.tile(np.floor(saved / quantum + 1e-9).astype(np.int64), (steps - 1, 1))
    # savings count from every unit computing; a cached step doing so may cost more than a dense one (`full_step`)
    extra = (float(table.full_step) - float(table.dense_step)) * steps
    target = math.ceil((budget * dense_total + extra) / quantum - 1e-9)
    return savings, target, dense_total / quantum


def max_saving(num_steps: int, table: MacTable | None = None, num_units: int = 1, resolution: int = RESOLUTION):
    """The largest fraction of the MACs (of the plain sparsity without a table) that `solve_schedule` can save
    with `num_steps` steps: every unit reuses all its tokens after the first step, which always computes all."""
    units = len(table.units) if table is not None else num_units
    savings, offset, scale = _discretised(0.0, num_steps, table, units, resolution)
    return (float(savings.max(axis=1).sum()) - offset) / scale if len(savings) else 0.0


def check_num_steps(num_steps: int, steps_name: str = "steps") -> None:
    """Refuse fewer than 2 steps: the first step always computes everything, so they could save nothing."""
    if num_steps < 2:
        raise InfeasibleBudget(
            f"{steps_name}={num_steps}: a cached schedule needs at least 2 steps (the first step always computes "
            f"everything, so {num_steps} step{'' if num_steps == 1 else 's'} can save nothing); "
            f"choose {steps_name} >= 2."
        )


def check_budget(
    budget: float,
    num_steps: int,
    table: MacTable | None = None,
    num_units: int = 1,
    *,
    budget_name: str = "budget",
    steps_name: str = "steps",
    resolution: int = RESOLUTION,
) -> None:
    """Refuse a step count below 2 or a budget that no schedule of `num_steps` steps can meet, saying what to
    choose instead (in fractions of the MACs, as the user gave the budget). `budget_name` and `steps_name` are the
    settings' names in the caller's configuration, for the message."""
    check_num_steps(num_steps, steps_name)
    units = len(table.units) if table is not None else num_units
    savings, target, _ = _discretised(budget, num_steps, table, units, resolution)
    if target > int(savings.max(axis=1).sum()):
        most = math.floor(max_saving(num_steps, table, units, resolution) * 100) / 100
        most_saved = (
            f"{most:.2f} of the {table.unit_name} can be saved" if table else f"{most:.2f} sparsity on average"
        )
        raise InfeasibleBudget(
            f"{budget_name}={budget} cannot be met: with {num_steps} steps and the first one always full, at most "
            f"{most_saved}; choose {budget_name} <= {most:.2f} or more steps ({steps_name})."
        )


def pick_full_steps(step_costs: np.ndarray, num_full: int) -> list[int]:
    """Stage 1's step DP: of the steps after the first (always full), choose `num_full - 1` more as full steps.

    `step_costs` (T, 2) holds the cost of step t being full (column 0) or not (column 1).
    """
    step_costs = np.asarray(step_costs, dtype=np.float64)
    steps = len(step_costs)
    if not 1 <= num_full <= steps:
        raise InfeasibleBudget(f"num_full must be in 1..{steps}, got {num_full}")
    savings = np.tile(np.array([0, 1], dtype=np.int64), (steps - 1, 1))
    picked = solve(step_costs[1:], savings, steps - num_full, exact=True)
    return [0] + [t + 1 for t in range(steps - 1) if picked[t] == 0]

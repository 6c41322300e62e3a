"""The learnable sparsity cost predictor and the straight-through choice (DiffSparse section 3.2).

`CostPredictor` holds one parameter of shape (T, U, |A|): one cost per action (`levels.ACTIONS`: a level of S with
its reused tokens copied or forecast), or per level (|S|, copy only, the paper's set-up). Its costs are
normalised per (step, unit) with a softmax, so every row of costs lies in (0, 1) and sums to 1: an action's cost is
its share of that row. `straight_through` turns costs into the DP's hard one-hot choice in the forward pass and lets
the gradient reach the costs through a soft assignment `softmax(-costs / temperature)` in the backward pass.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from diffsparse.accounting.macs import MacTable
from diffsparse.allocate.solver import solve_schedule
from diffsparse.levels import ACTIONS, SPARSITY_LEVELS
from diffsparse.schedule import Schedule


class CostPredictor(nn.Module):
    """(T x U) x |A| learnable costs.

    Args:
        num_steps, num_units: the schedule's shape.
        init: a `Schedule` whose actions start out cheapest (by `margin` in logit space), or None for equal costs.
        forecast: one cost per action of `levels.ACTIONS` (True), or per level of S, copy only (False).
    """

    def __init__(
        self, num_steps: int, num_units: int, init: Schedule | None = None, margin: float = 2.0, forecast: bool = False
    ):
        super().__init__()
        logits = torch.zeros(num_steps, num_units, len(ACTIONS) if forecast else len(SPARSITY_LEVELS))
        if init is not None:
            if init.grid.shape != (num_steps, num_units):
                raise ValueError(f"init schedule is {init.grid.shape}, the predictor ({num_steps}, {num_units})")
            if init.forecast.any() and not forecast:
                raise ValueError("init schedule forecasts, but the predictor has copy actions only (forecast=False)")
            chosen = torch.as_tensor(init.action_indices() if forecast else init.level_indices())
            logits.scatter_(2, chosen[..., None], -margin)
        self.logits = nn.Parameter(logits)

    def restart(self, init: Schedule, margin: float = 2.0) -> None:
        """Costs afresh, with `init`'s actions cheapest (the recipe's chosen start)."""
        fresh = CostPredictor(*self.logits.shape[:2], init, margin, self.logits.shape[-1] == len(ACTIONS))
        with torch.no_grad():
            self.logits.copy_(fresh.logits.to(self.logits.dtype))

    def forward(self) -> torch.Tensor:
        """Normalised costs (T, U, |S|): a softmax over the levels of each (step, unit)."""
        return self.logits.softmax(dim=-1)


TIE_BREAK = 1e-6


def choose(costs: torch.Tensor, budget: float, table: MacTable | None = None) -> torch.Tensor:
    """The DP's level or action indices (T, U) for `costs` under `budget` (see `solver.solve_schedule`).

    Costs that start out equal (a schedule-initialised predictor has many exact ties) are told apart by a fixed
    pseudo-random offset of at most `TIE_BREAK`, far above float noise: otherwise the last bits of a gradient,
    which differ with how a batch is split over processes, would decide the ties.
    """
    return torch.as_tensor(solve_schedule(tie_broken(costs), budget, table))


def tie_broken(costs: torch.Tensor) -> np.ndarray:
    """`costs` as float64 numpy plus a fixed pseudo-random offset in [0, TIE_BREAK) per entry."""
    c = costs.detach().cpu().double().numpy()
    return c + np.random.default_rng(0).uniform(0.0, TIE_BREAK, size=c.shape)


def straight_through(costs: torch.Tensor, levels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """One-hot of `levels` (T, U, |S|) in the forward pass; the gradient of `softmax(-costs / temperature)` in the
    backward pass, so lowering a level's cost is what the loss asks for when it wants that level more."""
    soft = torch.softmax(-costs / temperature, dim=-1)
    hard = torch.nn.functional.one_hot(levels.to(costs.device), costs.shape[-1]).to(soft.dtype)
    return hard + soft - soft.detach()


def schedule_from_levels(levels: torch.Tensor | np.ndarray, units, meta: dict | None = None) -> Schedule:
    grid = np.asarray(levels, dtype=np.float64) / (len(SPARSITY_LEVELS) - 1)
    return Schedule(grid, units, meta)


def schedule_from_choice(choice: torch.Tensor | np.ndarray, num_choices: int, units, meta=None) -> Schedule:
    """The schedule of the DP's indices: into `levels.ACTIONS` when `num_choices` is their count, else levels."""
    if num_choices == len(ACTIONS):
        return Schedule.from_actions(np.asarray(choice), units, meta)
    return schedule_from_levels(choice, units, meta)

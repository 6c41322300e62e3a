"""The learnable sparsity cost predictor and the straight-through choice (DiffSparse section 3.2).

`CostPredictor` holds one parameter of shape (T, U, |S|). Its costs are normalised per (step, unit) with a
softmax over the levels, so every row of costs lies in (0, 1) and sums to 1: a level's cost is its share of
that row. `straight_through` turns costs into the DP's hard one-hot choice in the forward pass and lets the
gradient reach the costs through a soft assignment `softmax(-costs / temperature)` in the backward pass.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from diffsparse.accounting.macs import MacTable
from diffsparse.allocate.solver import solve_schedule
from diffsparse.levels import SPARSITY_LEVELS
from diffsparse.schedule import Schedule


class CostPredictor(nn.Module):
    """(T x U) x |S| learnable costs.

    Args:
        num_steps, num_units: the schedule's shape.
        init: a `Schedule` whose levels start out cheapest (by `margin` in logit space), or None for equal costs.
    """

    def __init__(self, num_steps: int, num_units: int, init: Schedule | None = None, margin: float = 2.0):
        super().__init__()
        logits = torch.zeros(num_steps, num_units, len(SPARSITY_LEVELS))
        if init is not None:
            if init.grid.shape != (num_steps, num_units):
                raise ValueError(f"init schedule is {init.grid.shape}, the predictor ({num_steps}, {num_units})")
            chosen = torch.as_tensor(init.level_indices())
            logits.scatter_(2, chosen[..., None], -margin)
        self.logits = nn.Parameter(logits)

    def forward(self) -> torch.Tensor:
        """Normalised costs (T, U, |S|): a softmax over the levels of each (step, unit)."""
        return self.logits.softmax(dim=-1)


TIE_BREAK = 1e-6


def choose(costs: torch.Tensor, budget: float, table: MacTable | None = None) -> torch.Tensor:
    """The DP's level indices (T, U) for `costs` under `budget` (see `solver.solve_schedule`).

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

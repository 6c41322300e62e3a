"""Hand-made schedules: what users of token caching set by hand today."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .cache.backbones import CROSS_ATTN, MLP, SELF_ATTN
from .schedule import Schedule


def _kind_of(unit: str) -> str:
    """Unit kind from its name, for the backbones in the registry (attn1 / attn2 / ff)."""
    leaf = unit.rsplit(".", 1)[-1]
    return {"attn1": SELF_ATTN, "attn2": CROSS_ATTN, "ff": MLP}.get(leaf, MLP)


def uniform(units: Sequence[str], num_steps: int, sparsity: float) -> Schedule:
    """Every unit reuses `sparsity` of its tokens at every step after the first."""
    return Schedule.uniform(units, num_steps, sparsity)


def toca_like(
    units: Sequence[str],
    num_steps: int,
    interval: int = 3,
    sparsity: dict[str, float] | None = None,
) -> Schedule:
    """A full step every `interval` steps; in between, a fixed sparsity per unit kind (ToCa's shape).

    ToCa (Zou et al., ICLR 2025) forces full steps at a fixed interval and reuses a fixed fraction of each
    module type's tokens in between. The defaults here reuse more in the MLPs than in self-attention.
    """
    per_kind = {SELF_ATTN: 0.5, CROSS_ATTN: 0.75, MLP: 0.75, **(sparsity or {})}
    grid = np.zeros((num_steps, len(units)))
    row = np.array([per_kind[_kind_of(u)] for u in units])
    for t in range(num_steps):
        if t % interval:
            grid[t] = row
    meta = {"method": "toca_like", "interval": interval, "sparsity": per_kind}
    return Schedule(grid, units, meta)

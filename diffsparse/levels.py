"""The sparsity levels S and how many tokens a level recomputes: the one fact the schedule, the runtime and the
accounting share. Imports nothing of diffsparse."""

from __future__ import annotations

SPARSITY_LEVELS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
"""The candidate set S: fraction of a unit's tokens reused from the cache (0 = compute all, 1 = reuse all)."""


def fresh_tokens(sparsity: float, num_tokens: int) -> int:
    """How many of `num_tokens` a unit recomputes at `sparsity` (at least 1 and at most N-1 on a partial step)."""
    if sparsity <= 0.0:
        return num_tokens
    if sparsity >= 1.0:
        return 0
    return min(max(num_tokens - int(round(sparsity * num_tokens)), 1), num_tokens - 1) if num_tokens > 1 else 1

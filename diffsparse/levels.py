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


COPY = "copy"
FORECAST = "forecast"
ACTIONS: tuple[tuple[float, str], ...] = tuple((s, COPY) for s in SPARSITY_LEVELS) + tuple(
    (s, FORECAST) for s in SPARSITY_LEVELS if s > 0.0
)
"""What a unit can do at a step: recompute a level's share of its tokens and, for the tokens it does not recompute,
copy their last output (`COPY`) or forecast it by a Taylor step from their last computations (`FORECAST`). Level 0
recomputes everything, so it has one action. Action a < len(S) is level a with copy; a >= len(S) is level
a - len(S) + 1 with forecast."""

ACTION_LEVELS: tuple[int, ...] = tuple(SPARSITY_LEVELS.index(s) for s, _ in ACTIONS)
"""The index into `SPARSITY_LEVELS` of each action."""


def action_index(level: int, forecast: bool) -> int:
    """The action of level index `level` with copy or (`forecast`, level > 0) forecast."""
    return level + (len(SPARSITY_LEVELS) - 1) * (bool(forecast) and level > 0)

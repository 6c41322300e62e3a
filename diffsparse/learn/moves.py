"""The two moves `learn.refine` tries on a schedule's actions (T, U), at a step t >= 1 (the first step stays full):
`swap` trades steps t and t + 1, `shift` rotates steps t..T-1 by one, later or earlier. Each permutes steps, so it
keeps the saved MACs exactly. Why these moves and how they are judged: `learn.refine`.
"""

from __future__ import annotations

import numpy as np

MOVES = ("swap", "shift")


def swap_moves(actions: np.ndarray) -> list[int]:
    """The steps t (1 <= t < T - 1) whose actions differ from step t + 1's: swapping them changes the schedule."""
    return [t for t in range(1, len(actions) - 1) if not np.array_equal(actions[t], actions[t + 1])]


def swapped(actions: np.ndarray, t: int) -> np.ndarray:
    """`actions` with the actions of steps t and t + 1 traded."""
    out = actions.copy()
    out[[t, t + 1]] = out[[t + 1, t]]
    return out


def shifted(actions: np.ndarray, t: int) -> list[tuple[tuple, np.ndarray]]:
    """The steps t.. of `actions` (T, U) shifted by one step, as (record, candidate): later (the last step's action
    moves to t), recorded (t, "later"), and earlier (step t's moves to the end), (t, "earlier"); a candidate equal
    to `actions` is left out."""
    later = np.concatenate([actions[:t], actions[-1:], actions[t:-1]])
    earlier = np.concatenate([actions[:t], actions[t + 1 :], actions[t : t + 1]])
    return [(record, c) for record, c in (((t, "later"), later), ((t, "earlier"), earlier))
            if not np.array_equal(c, actions)]  # fmt: skip

"""Every method of `python -m diffsparse.evaluate --methods` by its command-line name (`BUILDERS`), fitted to a
budget: ours and diffusers' (`methods.py`) and the peers' (`peers.py`), whose rows are skipped with a note where
their package is not installed."""

from __future__ import annotations

from collections.abc import Callable

from diffsparse.allocate.registry import ALLOCATORS
from diffsparse.evaluate.methods import (
    Fitting,
    Method,
    fewer_steps_method,
    first_block_cache_method,
    pab_method,
    schedule_method,
    taylorseer_method,
)
from diffsparse.evaluate.peers import build_cache_dit, unavailable


def skipped_notes(names) -> list[str]:
    """Why rows among the method names `names` are skipped on this machine (a peer whose package is not installed),
    for the table's footer; the same notes the harness logs."""
    return [note for note in map(unavailable, dict.fromkeys(names)) if note]


# Every method, by name, in the table's default order.
BUILDERS: dict[str, Callable[[Fitting], Method]] = {
    "dense": lambda fit: Method("dense", fit.steps),
    "fewer-steps": fewer_steps_method,
    **{spec.method: schedule_method(spec) for spec in ALLOCATORS.values()},
    "fbc": first_block_cache_method,
    "taylorseer": taylorseer_method,
    "pab": pab_method,
    # peers: run where their package is installed; elsewhere their rows are skipped with a note (`Unavailable`)
    "cache-dit": build_cache_dit,
}

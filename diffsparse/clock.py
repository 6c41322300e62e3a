"""A clock for work that may run on an accelerator: synchronised at both ends, so that queued work is counted.

The project's one timing helper is `diffsparse.evaluate.timing` (alternated runs); this is its stopwatch, here so
that the runtime's cost measurements (`diffsparse.cache.costs`) use the same clock without importing the
evaluation. Imports nothing of diffsparse.
"""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the work queued on `device` (CUDA only; CPU work is done when the call returns)."""
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


class Stopwatch:
    """Times the block it wraps (`seconds`), with the device synchronised when it starts and when it stops."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = device
        self.seconds: float | None = None

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


__all__ = ["Stopwatch", "synchronize"]

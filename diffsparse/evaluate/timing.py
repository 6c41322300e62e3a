"""Wall-clock speed-ups measured the one way the project quotes them: the runs alternate in one process (A B A B
..., or A B C A B C ... for several methods), after an untimed warm-up round of every run, with the device
synchronised at both ends of each timed block; a method's speed-up in a round is that round's dense time over its
own, and we quote the median and the min-max over the rounds.

Why not `torch.utils.benchmark.Timer`: it times one statement, repeated back to back (`timeit`,
`blocked_autorange`), while drift (other processes, clocks, caches) cancels only when dense and method take turns;
it runs its statement with torch set to one thread unless told otherwise, where we time the model as the user runs
it; and a run here is a whole sampling trajectory (seconds), so its statistics over many tiny repeats are not what
we need. Its one service we keep is synchronising the accelerator around the clock (`Stopwatch`).

Example:
    >>> timings = alternate({"dense": timed(dense_fn), "cached": timed(cached_fn)}, rounds=3, device=device)
    >>> timings.speedup("cached").median
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from diffsparse.clock import Stopwatch as Stopwatch  # re-exported: the stopwatch of the timing helper
from diffsparse.clock import synchronize as synchronize

# A run: called with a `Stopwatch` it must enter around the work to time (set-up such as applying a cache stays
# outside); returns its output.
Run = Callable[[Stopwatch], Any]


def timed(fn: Callable[[], Any]) -> Run:
    """The run that times the whole of `fn()`."""

    def run(clock: Stopwatch):
        with clock:
            return fn()

    return run


@dataclass(frozen=True)
class Speedup:
    """Median, min and max over rounds of baseline time / method time."""

    median: float
    low: float
    high: float

    def as_row(self) -> dict[str, float]:
        """The keys the tables and results use: `speedup`, `speedup_min`, `speedup_max`."""
        return {"speedup": self.median, "speedup_min": self.low, "speedup_max": self.high}


@dataclass(frozen=True)
class Timings:
    """Seconds of every run in every timed round, and each run's output in the last round."""

    seconds: dict[str, list[float]]
    outputs: dict[str, Any]

    def speedup(self, name: str, baseline: str = "dense") -> Speedup:
        ratios = [b / t for b, t in zip(self.seconds[baseline], self.seconds[name], strict=True)]
        return Speedup(statistics.median(ratios), min(ratios), max(ratios))

    def median_seconds(self, name: str) -> float:
        return statistics.median(self.seconds[name])


def alternate(
    runs: Mapping[str, Run], rounds: int, warmup: int = 1, device: torch.device | str | None = None, progress=None
) -> Timings:
    """Call every run in turn, in the order given, `warmup` untimed rounds and then `rounds` timed ones.

    Args:
        runs: name -> run (see `Run`; `timed(fn)` times a whole call); the baseline (`dense`) first.
        rounds: timed rounds, at least 1.
        device: the device the runs compute on, synchronised around every timed block (CUDA).
        progress: called once after every run (a progress bar's `update`), or None.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    outputs: dict[str, Any] = {}
    for r in range(warmup + rounds):
        for name, run in runs.items():
            clock = Stopwatch(device)
            outputs[name] = run(clock)
            if clock.seconds is None:
                raise RuntimeError(f"Run {name!r} never started its stopwatch: wrap the timed work in `with clock:`.")
            if r >= warmup:
                seconds[name].append(clock.seconds)
            if progress is not None:
                progress()
    return Timings(seconds, outputs)


PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def _loaded_allocator(maps: str = "/proc/self/maps") -> str | None:
    """The replacement allocator mapped into this process (its memory map, `maps`), if any: what is loaded, not
    what `LD_PRELOAD` asked for."""
    try:
        with open(maps) as f:
            maps = f.read()
    except OSError:
        return None
    return next((name for name in PRELOADED_ALLOCATORS if f"lib{name}" in maps), None)


def allocator_note(device: torch.device | str | None = None) -> str:
    """How host memory was allocated in this process, for a table of CPU speed-ups: with glibc's malloc as it
    comes, a process may map and unmap its large buffers at every call, which slows dense more than the cached
    rows and flatters them (docs/results/speed.md#bound). '' on an accelerator, or where glibc is not the C
    library. Settings: any `MALLOC_*_` variable and `GLIBC_TUNABLES`' `glibc.malloc.*` entries."""
    if device is not None and torch.device(device).type != "cpu":
        return ""
    loaded = _loaded_allocator()
    if loaded is not None:
        return f"host allocator {loaded}"
    if platform.libc_ver()[0] != "glibc":
        return ""
    settings = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") and k.endswith("_")]
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t.startswith("glibc.malloc.")]
    if settings or tunables:
        return "glibc malloc with " + ", ".join(settings + tunables)
    return "glibc malloc as it comes (dense time can vary between processes)"


def speedup(
    dense: Run, method: Run, rounds: int, warmup: int = 1, device: torch.device | str | None = None
) -> Speedup:
    """Dense time / method time, alternated (`alternate`)."""
    return alternate({"dense": dense, "method": method}, rounds, warmup, device).speedup("method")

"""Peak memory of a call: `torch.cuda.max_memory_allocated` growth on a GPU, resident-set growth on the CPU."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable

import torch


class _PeakRSS:
    """Samples this process's resident set size in a thread; `peak - start` is the growth during the block."""

    def __enter__(self):
        _trim()
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth(self) -> int:
        return self.peak - self.start


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    """Give freed heap memory back to the OS so the next peak is measured from a clean base.

    glibc only; elsewhere the growth figure is a lower bound.
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def peak_memory(fn: Callable[[], object]) -> int:
    """Bytes by which `fn()` raised the peak: allocated CUDA memory when CUDA is there, else the resident set."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - base
    with _PeakRSS() as probe:
        fn()
    return probe.growth

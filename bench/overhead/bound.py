"""How close the reference model's token-cache rows can come to their MAC reduction while the blocks' work outside
the units runs on every token (issue 17's 0.9 target).

    python bench/overhead/bound.py            # reference model, budget 0.5, 20 samples, 50 DDIM steps, 2 threads

A trajectory's time splits into its units' (the cached modules' forwards, the hooks' choosing and copying
included; timed by forward hooks on those modules) and the rest: adaLN-Zero's timestep and class embedding and
its modulation, the LayerNorms, the gated residual adds, patch embedding and output layers, the sampler. The rest
has almost no MACs (`MacTable.other` plus the units' share of nothing), so MAC accounting cannot see it, but on a
model of width 128 and 64 tokens it is a seventh of a dense step. A partial-token step still runs all of it: the
keys and values of every token need every token normed and modulated.

For each method, dense and the method alternate (`evaluate.timing.alternate`); the table gives the medians and
the *bound*: the efficiency the method would reach if its units' time fell exactly by their own MAC reduction
while the rest took what it took in the measured run, `T_dense / (r * (U_dense / r_units + R_method))`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from case import fitted, model, ref, run

import diffsparse.cache.hooks as unit_hooks
from diffsparse.cache import cacheable_units
from diffsparse.cache.selectors.base import TokenSelector
from diffsparse.evaluate.timing import alternate

METHODS = ("toca", "duca", "uniform", "fora", "forecast_fora")


def _add_time(owner, name: str, clock) -> None:
    """Wrap `owner.name` so that each call adds its wall-clock seconds to `clock.seconds`."""
    fn = getattr(owner, name)

    def timed_fn(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock.seconds += time.perf_counter() - start

    setattr(owner, name, timed_fn)


class UnitClock:
    """Wall-clock seconds spent in the units, summed: their modules' forwards (hooks on each), and the MLP's
    partial compute where the block's runner calls it directly (`TokenCacheUnitHook.fresh_rows`, its norm and
    modulation of the fresh rows included)."""

    def __init__(self, modules):
        self.seconds = 0.0
        self._start = {}
        for m in modules:
            m.register_forward_pre_hook(self._pre)
            m.register_forward_hook(self._post)
        _add_time(unit_hooks.TokenCacheUnitHook, "fresh_rows", self)

    def _pre(self, module, args):
        self._start[module] = time.perf_counter()

    def _post(self, module, args, output):
        self.seconds += time.perf_counter() - self._start.pop(module)


class BookkeepingClock:
    """Wall-clock seconds the unit hooks spend choosing tokens (`TokenSelector.select`) and moving their rows
    (`flat_rows`, `take_rows`, `put_rows`), summed: the part of the units' time that is not their compute."""

    def __init__(self):
        self.seconds = 0.0
        _add_time(TokenSelector, "select", self)
        for name in ("flat_rows", "take_rows", "put_rows"):
            _add_time(unit_hooks, name, self)


def reductions(schedule) -> tuple[float, float]:
    """(whole-model MAC reduction, the units' own MAC reduction) of `schedule` on the case's batch."""
    table = ref.mac_table()
    steps = table.step_macs(schedule.level_indices())
    dense = table.dense_step * schedule.num_steps
    units_dense = dense - table.other * schedule.num_steps
    return dense / steps.sum(), units_dense / (steps.sum() - table.other * schedule.num_steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=sorted(fitted))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "bound-reference.md")
    args = parser.parse_args()

    names = list(cacheable_units(model))
    clock, books = UnitClock([model.get_submodule(n) for n in names]), BookkeepingClock()
    unit_seconds: dict[str, list[float]] = {}
    book_seconds: dict[str, list[float]] = {}

    def timed_run(name, schedule):
        def go(stopwatch):
            clock.seconds = books.seconds = 0.0
            with stopwatch:
                out = run(schedule)
            unit_seconds.setdefault(name, []).append(clock.seconds)
            book_seconds.setdefault(name, []).append(books.seconds)
            return out

        return go

    runs = {"dense": timed_run("dense", None)} | {m: timed_run(m, fitted[m]) for m in args.methods}
    timings = alternate(runs, rounds=args.rounds)
    for name in unit_seconds:  # drop the warm-up round's
        unit_seconds[name], book_seconds[name] = unit_seconds[name][1:], book_seconds[name][1:]

    t_dense = timings.median_seconds("dense")
    u_dense = statistics.median(unit_seconds["dense"])
    lines = [
        f"`python bench/overhead/bound.py --rounds {args.rounds}` (reference model, budget 0.5, 20 samples, "
        f"50 DDIM steps, {torch.get_num_threads()} threads; medians of {args.rounds} alternated rounds)",
        "",
        "| method | MAC reduction | units' MAC reduction | speed-up (min-max) | efficiency | units ms "
        "| of which choosing and moving tokens | rest ms | units' speed-up | bound |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| dense | 1.00x | 1.00x | 1.00x | 1.00 | {u_dense * 1e3:.1f} | 0.0 | {(t_dense - u_dense) * 1e3:.1f} | "
        "1.00x | 1.00 |",
    ]
    for m in args.methods:
        r, r_units = reductions(fitted[m])
        s = timings.speedup(m)
        t, u, books_m = (
            timings.median_seconds(m),
            statistics.median(unit_seconds[m]),
            statistics.median(book_seconds[m]),
        )
        bound = t_dense / (r * (u_dense / r_units + (t - u)))
        lines.append(
            f"| {m} | {r:.2f}x | {r_units:.2f}x | {s.median:.2f}x ({s.low:.2f}-{s.high:.2f}) | {s.median / r:.2f} "
            f"| {u * 1e3:.1f} | {books_m * 1e3:.1f} | {(t - u) * 1e3:.1f} | {u_dense / u:.2f}x | {bound:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()

"""How close the reference model's token-cache rows can come to their MAC reduction while the blocks' work outside
the units runs on every token (issue 17's 0.9 target).

    python bench/overhead/bound.py            # reference model, budget 0.5, 20 samples, 50 DDIM steps, 2 threads
    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=17179869184 python bench/overhead/bound.py
                                              # freed memory kept: dense and cached on equal terms (`machine_state`)

A trajectory's time splits into its units' (the cached modules' forwards, the hooks' choosing and copying
included; timed by forward hooks on those modules) and the rest: adaLN-Zero's timestep and class embedding and
its modulation, the LayerNorms, the gated residual adds, patch embedding and output layers, the sampler. The rest
has almost no MACs (`MacTable.other`), so MAC accounting cannot see it, but on a
model of width 128 and 64 tokens it is a seventh of a dense step. A partial-token step still runs most of it: the
keys and values of every token need every token normed and modulated (only the MLP's norm and modulation run on
its fresh tokens: `BlockList.fresh_mlp`).

For each method, dense and the method alternate (`evaluate.timing.alternate`); the table gives the medians and
the *bound*: the efficiency the method would reach if its units' time fell exactly by their own MAC reduction
while the rest took what it took in the measured run, `T_dense / (r * (U_dense / r_units + R_method))`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from case import fitted, model, ref, run
from torch.utils.benchmark import Timer

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


def machine_state() -> float:
    """How much more a row costs in a dense-sized MLP than in a partial-sized one, on a block's MLP weights (2560
    rows, a dense step's, against 1000, a partial step's at 0.6), in this process. About 1.0 when large buffers
    are reused; 1.6 and more seen when glibc's malloc maps and unmaps them at every call (page faults on each
    new buffer; per process, so it changes from run to run). That slows dense more than the partial steps and
    flatters every cached row: run with `MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=17179869184`
    to keep freed memory and read the rows on equal terms. A symptom to check, not a guarantee: a run was seen
    with dense a third slower than usual while this read 1.03 and 1.07 (docs/results/speed.md#bound)."""
    mlp = model.transformer_blocks[0].ff.net
    (up, down), cost = (mlp[0].proj, mlp[2]), {}
    weights = {"w1": up.weight.detach(), "b1": up.bias.detach(), "w2": down.weight.detach(), "b2": down.bias.detach()}
    for rows in (2560, 1000):
        x = torch.randn(rows, up.in_features)
        stmt = "F.linear(F.gelu(F.linear(x, w1, b1), approximate='tanh'), w2, b2)"
        timer = Timer(stmt, globals={"F": F, "x": x, **weights}, num_threads=torch.get_num_threads())
        timer.timeit(20)  # warm-up: the process's first calls at this size
        cost[rows] = timer.blocked_autorange(min_run_time=1).median / rows
    return cost[2560] / cost[1000]


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
    state_before = machine_state()
    timings = alternate(runs, rounds=args.rounds)
    state_after = machine_state()
    for name in unit_seconds:  # drop the warm-up round's
        unit_seconds[name], book_seconds[name] = unit_seconds[name][1:], book_seconds[name][1:]

    t_dense = timings.median_seconds("dense")
    u_dense = statistics.median(unit_seconds["dense"])
    lines = [
        f"`python bench/overhead/bound.py --rounds {args.rounds}` (reference model, budget 0.5, 20 samples, "
        f"50 DDIM steps, {torch.get_num_threads()} threads; medians of {args.rounds} alternated rounds; "
        f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}, "
        f"MALLOC_TRIM_THRESHOLD_={os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')})",
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
    lines += [
        "",
        f"Allocator state (cost per row of a block's MLP at 2560 rows over 1000, this process; about 1.0 when "
        "large buffers are reused): "
        f"{state_before:.2f} before, {state_after:.2f} after.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()

"""Why DiT-XL/2's cached steps on this CPU stop short of their MAC reduction (issue 17's 0.95 target).

    python bench/overhead/ceiling.py            # DiT-XL/2, 256 tokens, batch 2 (one CFG pair), 2 threads

1. **Matrix multiplies by row count.** A partial step runs the units' linear layers on fewer rows (batch x fresh
   tokens: 512 dense, 256 at sparsity 0.5, 128 at 0.75). Throughput of `F.linear` (what eager PyTorch runs, MKL
   here) at each row count, against oneDNN with the weight packed ahead (inductor's CPU path; a private op, used
   here only to measure).
2. **One step of each kind**, alternated, median of `--reps`: dense, and the partial step of uniform-s after a full
   step, its speed-up against its own MAC reduction (the step's efficiency); then the same with every linear layer
   of the model on the packed oneDNN path (dense too).
3. **Where a partial step's time goes** (torch.profiler, self CPU time by kind of operator), dense beside it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch.profiler import profile

from diffsparse.backbones import forward_kwargs
from diffsparse.cache import apply_token_cache, cacheable_units, remove_token_cache
from diffsparse.cache.hooks import token_cache_controller
from diffsparse.evaluate.bench import bench_model
from diffsparse.schedule import Schedule

KINDS = {  # profiler operator -> kind
    "matmul": ("aten::addmm", "aten::mm", "aten::bmm", "mkldnn::_linear_pointwise"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",),
    "gelu": ("aten::gelu",),
    "norms": ("aten::native_layer_norm",),
    "elementwise": ("aten::add", "aten::mul", "aten::div", "aten::sub", "aten::silu", "aten::add_", "aten::mul_"),
    "choosing and moving tokens": tuple(
        f"aten::{op}"
        for op in ("index_select", "index_copy_", "topk", "scatter", "amax", "eq", "arange", "cat", "gather")
    ),
}


def gemm_table(rows=(512, 256, 128), shapes=((1152, 1152), (1152, 4608), (4608, 1152)), reps: int = 30):
    print("## Matrix multiplies: GFLOP/s (fraction of the 512-row throughput)\n")
    print("| in x out | rows | F.linear (MKL) | oneDNN, packed weight |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        for k, n in shapes:
            w, b = torch.randn(n, k), torch.randn(n)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, batch_size=rows[0])
            first = {}
            for m in rows:
                a = torch.randn(m, k)
                flops = {}
                runs = {
                    "mkl": partial(F.linear, a, w, b),
                    "onednn": partial(torch.ops.mkldnn._linear_pointwise, a, packed, b, "none", [], ""),
                }
                for name, fn in runs.items():
                    flops[name] = 2 * m * k * n / _median_seconds(fn, reps) / 1e9
                    first.setdefault(name, flops[name])
                cells = [f"{flops[x]:.0f} ({flops[x] / first[x]:.2f})" for x in ("mkl", "onednn")]
                print(f"| {k} x {n} | {m} | {cells[0]} | {cells[1]} |")
    print()


def _median_seconds(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pack_linears(model) -> None:
    """Every `nn.Linear` of `model` on oneDNN with its weight packed once (inference only)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            w = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), batch_size=512)
            bias = None if m.bias is None else m.bias.detach()
            m.forward = lambda x, w=w, bias=bias: torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def steps(model, inputs, cfg, sparsities, reps: int, label: str) -> None:
    units = cacheable_units(model)
    later = {**inputs, "timestep": inputs["timestep"] + 20}  # the full step comes first, at an earlier timestep

    def dense():
        model(**inputs)

    def partial_step(s):
        schedule = Schedule.uniform(units, 2, s)  # step 0 full, step 1 at sparsity s

        def run():
            token_cache_controller(model).reset()
            model(**later)  # untimed full step
            start = time.perf_counter()
            model(**inputs)
            return time.perf_counter() - start

        return schedule, run

    runs = {s: partial_step(s) for s in sparsities}
    seconds = {"dense": [], **{s: [] for s in sparsities}}
    with torch.inference_mode():
        for r in range(reps + 1):
            start = time.perf_counter()
            dense()
            if r:
                seconds["dense"].append(time.perf_counter() - start)
            for s, (schedule, run) in runs.items():
                apply_token_cache(model, schedule, selector="toca", cfg=cfg)
                took = run()
                remove_token_cache(model)
                if r:
                    seconds[s].append(took)
    macs = {s: schedule.macs(model, **inputs)["per_step_cached"] for s, (schedule, _) in runs.items()}
    base = statistics.median(seconds["dense"])
    print(f"## One step, {label} (median of {reps}, alternated)\n")
    print("| step | time (s) | MAC reduction | speed-up | efficiency |")
    print("|---|---|---|---|---|")
    print(f"| dense | {base:.3f} | 1.00x | 1.00x | 1.00 |")
    for s in sparsities:
        reduction = macs[s][0] / macs[s][1]
        speedup = base / statistics.median(seconds[s])
        print(f"| partial, sparsity {s} | {statistics.median(seconds[s]):.3f} | {reduction:.2f}x | {speedup:.2f}x | "
              f"{speedup / reduction:.2f} |")  # fmt: skip
    print()


def split(model, inputs, cfg, sparsity: float) -> None:
    units = cacheable_units(model)
    later = {**inputs, "timestep": inputs["timestep"] + 20}
    ops = {}
    with torch.inference_mode():
        model(**inputs)
        with profile() as prof:
            model(**inputs)
        ops["dense"] = prof.key_averages()
        apply_token_cache(model, Schedule.uniform(units, 2, sparsity), selector="toca", cfg=cfg)
        model(**later)
        with profile() as prof:
            model(**inputs)
        ops[f"partial, {sparsity}"] = prof.key_averages()
        remove_token_cache(model)
    print("## Where the time goes: self CPU ms by kind (profiled, so slower than unprofiled)\n")
    print("| kind | " + " | ".join(ops) + " |")
    print("|---" * (len(ops) + 1) + "|")
    totals = {row: sum(e.self_cpu_time_total for e in events) / 1e3 for row, events in ops.items()}
    for kind, names in [*KINDS.items(), ("other", None)]:
        cells = []
        for row, events in ops.items():
            known = {n for group in KINDS.values() for n in group}
            ms = sum(e.self_cpu_time_total for e in events
                     if (e.key in names if names else e.key not in known)) / 1e3  # fmt: skip
            cells.append(f"{ms:.1f} ({ms / totals[row]:.0%})")
        print(f"| {kind} | " + " | ".join(cells) + " |")
    print("| all | " + " | ".join(f"{t:.1f}" for t in totals.values()) + " |\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--size", default="XL/2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gemm_table()
    model, latents, conditions, cfg = bench_model("dit", args.size, 256, 2)
    x = torch.cat([latents, latents])
    inputs = forward_kwargs(model, x, torch.full((len(x),), 500), conditions)
    split(model, inputs, cfg, 0.75)
    steps(model, inputs, cfg, (0.5, 0.75), args.reps, "F.linear (MKL)")
    pack_linears(model)
    steps(model, inputs, cfg, (0.5, 0.75), args.reps, "every linear layer on packed oneDNN (dense too)")


if __name__ == "__main__":
    main()

"""Dense and cached trajectories each captured whole in one CUDA graph and replayed: the speed-up the token cache
gives once the host no longer sets the pace (eager launches and Python bookkeeping cost nothing at replay, for
dense and cached alike). Replays alternate in one process (`timing.alternate`); each graph's output is checked
against the eager `sample` of the same trajectory.

    python bench/gpu/graphs.py --device cuda --dtype bfloat16
    python bench/gpu/graphs.py --device cpu --dtype float32 --quick    # each row's eager run only (a CPU check)

What is captured is `models.sampling.sample` itself: it copies nothing from the host to the device
(`tests/test_compile.py` checks that on the meta device), and the schedulers read their coefficients on the host.
"""

from __future__ import annotations

import argparse
import sys
import traceback

import torch

from diffsparse.allocate.registry import named_schedule
from diffsparse.backbones import forward_kwargs
from diffsparse.cache import apply_token_cache, cacheable_units, remove_token_cache
from diffsparse.evaluate.bench import bench_scheduler, make_case
from diffsparse.evaluate.timing import alternate
from diffsparse.models.sampling import sample
from diffsparse.schedule import Schedule

CASES = {  # name: (backbone, size, tokens, batch, steps)
    "dit-xl2": ("dit", "XL/2", 256, 2, 20),
    "dit-xl2-batch16": ("dit", "XL/2", 256, 16, 20),
    "flux-1024": ("flux", "bench", 1024, 2, 20),
}
SCHEDULES = ("uniform-0.5", "uniform-0.75", "toca-like")


def captured(run) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """`run()` captured in a CUDA graph after one eager warm-up on a side stream. Returns the graph and the tensor
    its replays write the output to."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out


def run_case(name: str, backbone: str, size: str, tokens: int, batch: int, steps: int, args) -> int:
    case = make_case(backbone, size, tokens, batch, device=args.device, dtype=args.dtype)
    model, latents, conditions, cfg, options = case.model, case.latents, case.conditions, case.cfg, case.options
    units = cacheable_units(model)
    probe = torch.cat([latents, latents]) if cfg else latents
    inputs = forward_kwargs(model, probe, torch.tensor(500), conditions)  # as the bench counts MACs
    dense_macs = Schedule.uniform(units, steps, 0.0).macs(model, **inputs)["dense"]
    rows = {"dense": (None, False)}
    for s in SCHEDULES:
        rows[s] = (named_schedule(s, units, steps), False)
    for s in SCHEDULES[:2]:
        rows[f"{s}+kv"] = (named_schedule(s, units, steps), True)

    graphs, reductions, failed = {}, {}, 0
    with torch.inference_mode():
        for row, (schedule, kv) in rows.items():
            reductions[row] = 1.0
            if schedule is not None:  # MACs counted before the cache goes on, as the bench counts them
                reductions[row] = dense_macs / schedule.macs(model, reuse_kv=kv, **inputs)["cached"]
                apply_token_cache(model, schedule, cfg=cfg, reuse_kv=kv)

            def run():  # a whole trajectory; `sample` starts each with a fresh cache
                return sample(model, bench_scheduler(model), noise=latents, num_steps=steps, **options)

            try:
                eager = run()
                if not args.device.startswith("cuda"):
                    print(f"{name} {row}: eager run done (no CUDA graph on {args.device})", flush=True)
                    continue
                graph, out = captured(run)
                graph.replay()
                torch.cuda.synchronize()
                graphs[row] = (graph, out)
                diff = (out.float() - eager.float()).abs().max().item()
                print(f"{name} {row}: graph replay vs eager sample max |diff| {diff:.3g}", flush=True)
            except Exception:  # report and go on: one GPU session must bring back what it can
                traceback.print_exc()
                failed += 1
            finally:
                if schedule is not None:  # a captured graph keeps the cache's memory (its private pool), not the hooks
                    remove_token_cache(model)
    if args.device.startswith("cuda") and "dense" in graphs:
        runs = {row: _replay(graph) for row, (graph, _) in graphs.items()}
        timings = alternate(runs, rounds=args.rounds, device=args.device)
        print(f"{name}: {backbone}-{size}, {tokens} tokens, batch {batch}, {steps} steps, {args.dtype}, CUDA graphs")
        print("| row | MAC reduction | speed-up (median, min-max) | efficiency | time (ms) |")
        print("|---|---|---|---|---|")
        for row in graphs:
            sp, ms = timings.speedup(row), timings.median_seconds(row) * 1e3
            print(f"| {row} | {reductions[row]:.2f}x | {sp.median:.2f}x ({sp.low:.2f}-{sp.high:.2f}) | "
                  f"{sp.median / reductions[row]:.2f} | {ms:.1f} |", flush=True)  # fmt: skip
    return failed


def _replay(graph):
    def run(clock):
        with clock:
            graph.replay()

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--quick", action="store_true", help="tiny models, 4 steps (a check of the script on a CPU)")
    args = parser.parse_args()
    failed = 0
    for name in args.cases.split(","):
        backbone, size, tokens, batch, steps = CASES[name]
        if args.quick:
            size, tokens, steps = "tiny", 16, 4
        failed += run_case(name, backbone, size, tokens, batch, steps, args)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

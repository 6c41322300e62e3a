"""Where a cached trajectory's time goes on an accelerator: the device's busy time (the sum of its kernels' times,
from torch.profiler) against the wall time, and the host's launches and memory copies, for dense and each
schedule. If the cached rows' busy time is below dense's while their wall time is above it, the device waits on the
host: the cache saves device work that the host's launches and Python then spend.

    python bench/gpu/device_time.py --device cuda --dtype bfloat16
    python bench/gpu/device_time.py --device cpu --quick     # a check of the script (no device time on a CPU)
"""

from __future__ import annotations

import argparse
import time
from functools import partial

from exact import trajectory  # this folder's exactness check (run as a script, the folder is on the path)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from diffsparse.cache import apply_token_cache, cacheable_units, remove_token_cache
from diffsparse.clock import synchronize
from diffsparse.evaluate.bench import make_case
from diffsparse.schedule import Schedule

CASES = {"dit": ("XL/2", 256, 2, 20), "flux": ("bench", 1024, 2, 20)}
NOT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def profiled(run, device: str) -> dict:
    """One profiled run of `run()` after one warm-up: wall seconds (unprofiled, median of three), the device's busy
    seconds, kernel launches and host-device copies."""
    run()
    walls = []
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        walls.append(time.perf_counter() - start)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        run()
        synchronize(device)
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e6
    count = {e.key: e.count for e in events}
    return {
        "wall_s": sorted(walls)[1],
        "device_busy_s": busy,
        "launches": sum(count.get(k, 0) for k in LAUNCHES),
        "copies": count.get("cudaMemcpyAsync", 0),
        "aten_ops": sum(e.count for e in events if e.key.startswith("aten::")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quick", action="store_true", help="tiny models, 4 steps (a check of the script)")
    args = parser.parse_args()
    for name, (size, tokens, batch, steps) in CASES.items():
        if args.quick:
            size, tokens, steps = "tiny", 16, 4
        case = make_case(name, size, tokens, batch, device=args.device, dtype=args.dtype)
        model, latents, options, cfg = case.model, case.latents, case.options, case.cfg
        units = cacheable_units(model)

        run = partial(trajectory, model, latents, options, steps)
        rows = {"dense": profiled(run, args.device)}
        for sparsity in (0.5, 0.75):
            apply_token_cache(model, Schedule.uniform(units, steps, sparsity), cfg=cfg)
            rows[f"uniform-{sparsity}"] = profiled(run, args.device)
            remove_token_cache(model)
        # The partial steps' attention (fewer queries than keys) without the cuDNN backend, to see whether the copies
        # that come with it go
        apply_token_cache(model, Schedule.uniform(units, steps, 0.5), cfg=cfg)
        with sdpa_kernel(NOT_CUDNN):
            rows["uniform-0.5, no cuDNN attention"] = profiled(run, args.device)
        remove_token_cache(model)
        print(f"{name}-{size}, {tokens} tokens, batch {batch}, {steps} steps, {args.device}, {args.dtype}")
        print("| row | wall (s) | device busy (s) | busy / wall | launches | host-device copies | aten ops |")
        print("|---|---|---|---|---|---|---|")
        for row, r in rows.items():
            share = r["device_busy_s"] / r["wall_s"] if r["wall_s"] else 0.0
            print(f"| {row} | {r['wall_s']:.3f} | {r['device_busy_s']:.3f} | {share:.2f} | {r['launches']} | "
                  f"{r['copies']} | {r['aten_ops']} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

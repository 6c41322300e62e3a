"""On the bench's device and dtype: sparsity 0 against dense, bit for bit, and a cached schedule against itself
(a second run sees nothing of the first's cache), for DiT-XL/2 (256 tokens) and the FLUX bench width (1024
tokens), eager and with the units compiled. Prints one line per check; exits non-zero if one fails.

    python bench/gpu/exact.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys

import torch

from diffsparse.cache import apply_token_cache, cacheable_units, remove_token_cache
from diffsparse.evaluate.bench import bench_scheduler, make_case
from diffsparse.models.sampling import sample
from diffsparse.schedule import Schedule

CASES = {"dit": ("XL/2", 256), "flux": ("bench", 1024)}


def trajectory(model, latents, options, steps: int) -> torch.Tensor:
    with torch.inference_mode():
        return sample(model, bench_scheduler(model), noise=latents, num_steps=steps, **options)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny models (a check of the script on a CPU)")
    args = parser.parse_args()
    failed = 0
    for name, (size, tokens) in CASES.items():
        size, tokens = ("tiny", 16) if args.quick else (size, tokens)
        case = make_case(name, size, tokens, 2, device=args.device, dtype=args.dtype)
        model, latents, options, cfg = case.model, case.latents, case.options, case.cfg
        dense = trajectory(model, latents, options, args.steps)
        # compiled units and the eager dense model run different kernels: rounding may differ there, by a few units
        # in the last place of the dtype, relative to the output's largest value
        rounding = dense.abs().max().item() * (1e-4 if args.dtype == "float32" else 2e-2)
        units = cacheable_units(model)
        for compile_units in (False, True):
            apply_token_cache(model, Schedule.uniform(units, args.steps, 0.0), cfg=cfg, compile_units=compile_units)
            zero = trajectory(model, latents, options, args.steps)
            remove_token_cache(model)
            apply_token_cache(model, Schedule.uniform(units, args.steps, 0.5), cfg=cfg, compile_units=compile_units)
            first, second = (trajectory(model, latents, options, args.steps) for _ in range(2))
            remove_token_cache(model)
            back = trajectory(model, latents, options, args.steps)
            checks = {
                "sparsity 0 == dense": (zero - dense).abs().max().item(),
                "uniform-0.5 run twice": (first - second).abs().max().item(),
                "cache removed == dense": (back - dense).abs().max().item(),
            }
            compiled = "units compiled" if compile_units else "eager"
            for check, diff in checks.items():
                bound = rounding if compile_units and check == "sparsity 0 == dense" else 0.0
                ok = diff <= bound
                failed += not ok
                print(f"{name}-{size} {tokens} tokens {args.dtype} {compiled}: {check}: max |diff| {diff:.3g} "
                      f"({'ok' if ok else 'FAILED'}, bound {bound:g})", flush=True)  # fmt: skip
            err = (first.float() - dense.float()).pow(2).mean().sqrt().item()
            print(f"{name}-{size} {compiled}: uniform-0.5 RMS error against dense {err:.3g}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

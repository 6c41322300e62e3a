"""Resolution transfer: the reference model's learned schedule (learned at 16 x 16 pixels, 64 tokens) used unchanged
at other resolutions, against ToCa and uniform fitted to the same MAC saving at that resolution.

A schedule stores sparsities (fractions of each unit's tokens), not token counts, so it applies to any token grid.
DiT recomputes its sin-cos position embedding for the input's size, so the reference model runs at 24 x 24
(144 tokens) too, though it was trained at 16 x 16 only: the samples are its own (odd) digits, and each method
is judged against the dense samples at the same size (L2, PSNR), paired on the same noise.

    python bench/transfer_resolution.py --sizes 16 24 --samples 200 --out bench/transfer-resolution
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffsparse import Schedule, apply_token_cache, remove_token_cache
from diffsparse.allocate.baselines import budget_schedules
from diffsparse.evaluate.metrics import l2, paired_difference, psnr
from diffsparse.files import atomic_path
from diffsparse.models.sampling import initial_noise, sample_batched
from diffsparse.reference.model import DEFAULT_GUIDANCE, SHIPPED_SCHEDULE, load_reference


def run(sizes, samples: int, steps: int, seed: int, schedule_path: Path) -> list[dict]:
    ref = load_reference()
    model = ref.transformer
    learned = Schedule.load(schedule_path)
    if learned.num_steps != steps:
        learned = learned.resample(steps)
    labels = torch.arange(samples) % ref.num_classes
    rows = []
    for size in sizes:
        table = ref.mac_table(size)
        saved = table.saved_fraction(learned)
        scheduler = ref.scheduler("ddim")
        scheduler.set_timesteps(steps)
        fitted = budget_schedules(table, scheduler.timesteps.tolist(), saved)
        methods = {"learned (at 16x16)": learned, "toca": fitted["toca"], "uniform": fitted["uniform"]}
        noise = initial_noise(samples, (1, size, size), seed)

        def images(schedule=None, noise=noise):
            if schedule is not None:
                apply_token_cache(model, schedule, selector="toca")
            try:
                x = sample_batched(model, ref.scheduler("ddim"), labels, noise, steps, guidance_scale=DEFAULT_GUIDANCE)
            finally:
                if schedule is not None:
                    remove_token_cache(model)
            return (x.clamp(-1, 1) + 1) / 2

        dense = images()
        errors = {}
        for name, schedule in tqdm(methods.items(), desc=f"{size}x{size}"):
            x = images(schedule)
            errors[name] = l2(x, dense).numpy()
            rows.append({"size": size, "tokens": (size // 2) ** 2, "method": name,
                         "saved_macs": table.saved_fraction(schedule), "l2": float(errors[name].mean()),
                         "psnr": float(psnr(x, dense).mean())})  # fmt: skip
        base = errors["toca"]
        for row in rows[-len(methods) :]:
            e = errors[row["method"]]
            d = paired_difference(lambda i, e=e, b=base: float((e[i] - b[i]).mean()), samples, 1000, seed)
            row["dl2_vs_toca"] = [d.value, d.low, d.high]
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 24], help="image sizes in pixels (even)")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", type=Path, default=SHIPPED_SCHEDULE, help="the schedule learned at 16 x 16")
    p.add_argument("--out", type=Path, default=Path("bench/transfer-resolution"))
    args = p.parse_args(argv)
    if any(s % 2 for s in args.sizes):
        p.error("--sizes must be even (patch size 2)")
    rows = run(args.sizes, args.samples, args.steps, args.seed, args.schedule)
    lines = [
        "| size | tokens | method | MACs saved | L2 vs dense (x1e-4) | ΔL2 vs ToCa (x1e-4) | PSNR |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = np.asarray(r["dl2_vs_toca"]) * 1e4
        lines.append(f"| {r['size']}x{r['size']} | {r['tokens']} | {r['method']} | {r['saved_macs']:.1%} | "
                     f"{r['l2'] * 1e4:.2f} | {d[0]:.2f} [{d[1]:.2f}, {d[2]:.2f}] | {r['psnr']:.2f} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "results.json") as tmp:
        tmp.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    with atomic_path(args.out / "results.md") as tmp:
        tmp.write_text(table + "\n")


if __name__ == "__main__":
    main()

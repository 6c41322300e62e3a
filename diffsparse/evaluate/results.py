"""The outputs of `python -m diffsparse.evaluate`: results.csv / .json / .md, sample grids and the overview."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torchvision.utils import make_grid

from diffsparse.evaluate.builders import skipped_notes
from diffsparse.evaluate.metrics import Estimate
from diffsparse.evaluate.timing import allocator_note
from diffsparse.files import atomic_path
from diffsparse.grids import labelled_grid

COLUMNS = ("fd", "accuracy", "l2", "psnr", "ssim", "lpips", "dfd", "dl2", "dpsnr")
OFF_BUDGET = "⚠"
BUDGET_UNITS = {
    "macs": "MACs",
    "time": "time (as the time table predicts it: the hand-made rows are fitted on it, fewer-steps and the peers "
    "on MACs; rows are not flagged off the budget)",
}
DIGITS = {"fd": 2, "accuracy": 3, "l2": 2, "psnr": 2, "ssim": 3, "lpips": 3, "dfd": 2, "dl2": 2, "dpsnr": 2}
SCALE = {"l2": 1e4, "dl2": 1e4}
DELTA_NOTE = (
    "Δ columns: the row minus {}, on the same samples, with paired bootstrap intervals (an interval "
    "that leaves out 0: a difference beyond sampling noise)."
)


def column_names(compare_to: str | None) -> dict[str, str]:
    """The tables' headers of the quality columns (the Δ ones against `compare_to`)."""
    return {"fd": "FD ↓", "accuracy": "accuracy ↑", "l2": "L2 vs dense (x1e-4) ↓", "psnr": "PSNR vs dense ↑",
            "ssim": "SSIM vs dense ↑", "lpips": "LPIPS vs dense ↓", "dfd": f"ΔFD vs {compare_to} ↓",
            "dl2": f"ΔL2 vs {compare_to} (x1e-4) ↓", "dpsnr": f"ΔPSNR vs {compare_to} ↑"}  # fmt: skip


def estimate_cell(row: dict, column: str) -> str:
    """A quality column of a row as a table cell: `value [low, high]`, or — where the row has none."""
    e, d, k = row.get(column), DIGITS[column], SCALE.get(column, 1.0)
    return f"{e.value * k:.{d}f} [{e.low * k:.{d}f}, {e.high * k:.{d}f}]" if e else "—"


def flat_rows(rows: list[dict], metrics) -> list[dict]:
    """Rows for CSV and JSON: each `Estimate` of `metrics` as three keys (`psnr`, `psnr_low`, `psnr_high`; blank
    where the row has none)."""
    flat = []
    for r in rows:
        item = {k: v for k, v in r.items() if not isinstance(v, Estimate)}
        for c in metrics:
            e = r.get(c)
            item.update(
                {c: e.value, f"{c}_low": e.low, f"{c}_high": e.high} if e else {c: "", f"{c}_low": "", f"{c}_high": ""}
            )
        flat.append(item)
    return flat


def write_results(
    rows: list[dict], images: dict, cfg, command: str, out: Path, conditions: str = "", columns: int = 10
) -> None:
    """The table as results.csv, results.json and results.md, and the images as grids, in `out`.

    `conditions` says what the samples are conditioned on (the table's footnote); `columns`: samples per grid row
    (one per class of a class-conditional model).
    """
    out.mkdir(parents=True, exist_ok=True)
    flat = flat_rows(rows, [c for c in COLUMNS if any(c in r for r in rows)])
    table = markdown_table(rows, cfg, command, conditions)
    write_tables(out, "results", flat, cfg, table)
    save_grids(images, out, columns=columns)
    print(table)


def write_tables(out: Path, stem: str, flat: list[dict], cfg, table: str) -> None:
    """`stem`.csv, `stem`.json (with the config) and `stem`.md in `out`, each written whole or not at all."""
    _write_atomic(out / f"{stem}.csv", lambda f: _csv(f, flat))
    record = {"config": asdict(cfg), "host_allocator": allocator_note(), "rows": flat}
    _write_atomic(out / f"{stem}.json", lambda f: json.dump(record, f, indent=2))
    _write_atomic(out / f"{stem}.md", lambda f: f.write(table))


def _csv(f, flat: list[dict]) -> None:
    names = list(dict.fromkeys(k for row in flat for k in row))  # rows may add columns (pruning plans)
    writer = csv.DictWriter(f, fieldnames=names, restval="")
    writer.writeheader()
    writer.writerows(flat)


def _write_atomic(path: Path, write) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        write(f)


def allocator_clause() -> str:
    """`, <how host memory was allocated>` for a footnote after the thread count ('' where there is nothing to
    say); the evaluation times on the CPU."""
    note = allocator_note()
    return f", {note}" if note else ""


def markdown_table(rows: list[dict], cfg, command: str, conditions: str = "") -> str:
    """The results as a markdown table; intervals are 95 % bootstrap intervals over the samples."""
    metrics = [c for c in COLUMNS if any(c in r for r in rows)]
    names = column_names(cfg.compare_to)
    header = ["method", "setting", "steps", "GMACs / image", "MAC reduction", "speed-up (min-max)"]
    pruned = any("prep_minutes" in r for r in rows)
    header += ["weights MB", "prep. min"] if pruned else []
    header += [names[c] for c in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r["method"], r["setting"], str(r["steps"]), f"{r['gmacs_per_image']:.4f}",
            f"{r['mac_reduction']:.2f}x" + (f" {OFF_BUDGET}" if r.get("off_budget") else ""),
            f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})",
        ]  # fmt: skip
        if pruned:
            cells += [f"{r['weights_mb']:.2f}", f"{r['prep_minutes']:.2f}" if "prep_minutes" in r else "—"]
        cells += [estimate_cell(r, c) for c in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    compared = any(c in metrics for c in ("dfd", "dl2", "dpsnr"))
    settings = (
        f"{cfg.samples} samples ({conditions}), {cfg.sampler} {cfg.steps} steps, "
        f"guidance {cfg.guidance}, budget {cfg.budget:.0%} of dense {BUDGET_UNITS[cfg.budget_unit]}, "
        f"selector {cfg.selector}, seed {cfg.seed}; "
        f"speed-up: median of {cfg.rounds} dense/method alternations on {min(cfg.timing_samples, cfg.samples)} "
        f"samples, {torch.get_num_threads()} threads{allocator_clause()}. "
        "Brackets: 95 % bootstrap intervals over samples"
        + (f"; {DELTA_NOTE.format(cfg.compare_to)}" if compared else ".")
        + (" Weights MB: parameters kept in memory (routed: the model plus the plan's stored pruned weights; "
           "stitched: one pruned copy per stage). Prep. min: calibration + pruning (+ search) time of the plan."
           if pruned else "")
        + (f" {OFF_BUDGET}: the row's MAC saving is more than {cfg.budget_tolerance:.0%} of dense MACs off the "
           f"budget, so it is not compared at the budget." if any(r.get("off_budget") for r in rows) else "")
        + ("" if "fd" in metrics else " No FD / class accuracy: no feature network for this data (--feature-net).")
        + "".join(f" Row skipped: {note}." for note in skipped_notes(cfg.methods))
    )  # fmt: skip
    return "\n".join([f"`{command}`" if command else "", "", *lines, "", settings, ""])


def save_grids(images: dict[str, torch.Tensor], out: Path, columns: int = 10, per_column: int = 8) -> None:
    """samples/<method>.png: `per_column` rows of `columns` samples (one per class); overview.png: one row per
    method. Images in [0, 1], (N, C, H, W)."""
    (out / "samples").mkdir(parents=True, exist_ok=True)
    for name, x in images.items():  # small images (16 px digits) drawn at least 64 px a side
        n = min(len(x), per_column * columns)
        labelled_grid(x[:n], out / "samples" / f"{name}.png", [str(c) for c in range(min(columns, n))], title=name)
    first = next(iter(images.values()))
    width = columns * 0.6 * first.shape[-1] / first.shape[-2] + 1.5  # wide images (video frames side by side)
    fig = Figure(figsize=(width, len(images) * 0.75 + 0.3))  # no pyplot: no backend or global figure state
    axes = fig.subplots(len(images), 1)
    for ax, (name, x) in zip(np.atleast_1d(axes), images.items(), strict=True):
        row = make_grid(x[:columns], nrow=columns, padding=1, pad_value=1.0)
        ax.imshow(row.permute(1, 2, 0).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "overview.png", dpi=120)

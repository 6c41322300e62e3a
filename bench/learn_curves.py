"""Validation curves of recipe runs (`python train.py experiment=learn logger=csv ...`): val/l2 per epoch, with the
chosen start's validation L2 as a dashed line and the schedule after the neighbouring-step swaps (`learn.refine`;
one per pass where metrics.json lists them) as stars, one panel per run.

python bench/learn_curves.py OUT.png NAME=RUN_DIR [NAME=RUN_DIR ...]
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def curve(run: Path) -> tuple[list[int], list[float], dict]:
    """(epochs, val/l2 per epoch, metrics.json) of a recipe run's CSV log."""
    log = max(run.glob("logs/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    epochs, values = [], []
    with log.open() as f:
        for row in csv.DictReader(f):
            if row.get("val/l2"):
                epochs.append(int(row["epoch"]))
                values.append(float(row["val/l2"]))
    return epochs, values, json.loads((run / "metrics.json").read_text())


def main(argv: list[str]) -> None:
    out, runs = Path(argv[0]), [item.split("=", 1) for item in argv[1:]]
    fig = Figure(figsize=(4.2 * len(runs), 3.2))
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, (name, path) in zip(axes, runs, strict=True):
        epochs, values, metrics = curve(Path(path))
        ax.plot(epochs, values, "o-", label="learned (hard schedule, each epoch)")
        ax.axhline(metrics["start_val_l2"], ls="--", c="gray", label=f"best start: {metrics['start']}")
        refine = metrics.get("refine")
        if refine and refine.get("passes"):  # the schedule after each pass, validated (the best kept if better)
            for i, done in enumerate(refine["passes"]):
                label = f"after pass {i + 1}: {len(done['moves'])} swaps"
                ax.plot([len(epochs) + i], [done["val_l2"]], "*", ms=12, c=f"C{3 + i}", label=label)
        elif refine and refine["val_l2_after"] is not None:
            kept = "kept" if refine["kept"] else "not kept"
            label = f"after {len(refine['moves'])} swaps ({kept})"
            ax.plot([len(epochs)], [refine["val_l2_after"]], "*", ms=12, c="C3", label=label)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (then: the refinement)")
        ax.set_ylabel("validation L2 vs dense")
        exported = metrics["exported"]
        if refine and refine["kept"] and "swaps" not in exported:  # metrics.json written before 'exported' said so
            exported += f" + {len(refine['moves'])} swaps"
        ax.set_title(f"{name}: exported {exported}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1:])

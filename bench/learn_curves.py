"""Validation curves of recipe runs (`python train.py experiment=learn logger=csv ...`): the validation score per
epoch (`val/l2`, or `val/log_l2` for a run judged by it), with the chosen start's score as a dashed line and the
schedule after the neighbouring-step swaps (`learn.refine`; one per pass where metrics.json lists them) as stars,
one panel per run.

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
    """(epochs, validation score per epoch, metrics.json) of a recipe run's CSV log. Runs from before
    `learn.judge` (their metrics.json says `start_val_l2`, not `judge`) are given the new names here."""
    metrics = json.loads((run / "metrics.json").read_text())
    if "judge" not in metrics:
        metrics.update(judge="l2", start_val=metrics["start_val_l2"])
        for done in (metrics.get("refine") or {}).get("passes", []):
            done["val"] = done["val_l2"]
        if metrics.get("refine"):
            metrics["refine"]["val_after"] = metrics["refine"]["val_l2_after"]
    # `val/score` (the judge's; L2 for `both`), or the judge's own name in runs from before it was logged
    keys = ("val/score", "val/l2" if metrics["judge"] in ("l2", "both") else f"val/{metrics['judge']}")
    for done in [*(metrics.get("refine") or {}).get("passes", []), metrics.get("refine") or {}]:
        for name in ("val", "val_after"):  # `both` reports [L2, log L2]: the curve is the L2
            if isinstance(done.get(name), list):
                done[name] = done[name][0]
    log = max(run.glob("logs/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    epochs, values = [], []
    with log.open() as f:
        for row in csv.DictReader(f):
            value = row.get(keys[0]) or row.get(keys[1])
            if value:
                epochs.append(int(row["epoch"]))
                values.append(float(value))
    return epochs, values, metrics


def main(argv: list[str]) -> None:
    out, runs = Path(argv[0]), [item.split("=", 1) for item in argv[1:]]
    fig = Figure(figsize=(4.2 * len(runs), 3.2))
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, (name, path) in zip(axes, runs, strict=True):
        epochs, values, metrics = curve(Path(path))
        ax.plot(epochs, values, "o-", label="learned (hard schedule, each epoch)")
        ax.axhline(metrics["start_val"], ls="--", c="gray", label=f"best start: {metrics['start']}")
        refine = metrics.get("refine")
        if refine and refine.get("passes"):  # the schedule after each pass, validated (the best kept if better)
            for i, done in enumerate(refine["passes"]):
                label = f"after pass {i + 1}: {len(done['moves'])} moves"
                ax.plot([len(epochs) + i], [done["val"]], "*", ms=12, c=f"C{3 + i}", label=label)
        elif refine and refine["val_after"] is not None:
            kept = "kept" if refine["kept"] else "not kept"
            label = f"after {len(refine['moves'])} moves ({kept})"
            ax.plot([len(epochs)], [refine["val_after"]], "*", ms=12, c="C3", label=label)
        log_l2 = metrics["judge"] == "log_l2"  # its score is in dB
        if not log_l2:
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (then: the refinement)")
        ax.set_ylabel("validation mean log L2 (dB)" if log_l2 else "validation L2 vs dense")
        exported = metrics["exported"]
        # metrics.json written before 'exported' said so
        if refine and refine["kept"] and not exported.endswith(("swaps", "moves")):
            exported += f" + {len(refine['moves'])} moves"
        ax.set_title(f"{name}: exported {exported}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1:])

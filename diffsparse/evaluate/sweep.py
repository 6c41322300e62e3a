"""Efficiency curves: `python -m diffsparse.bench --sweep` runs the bench (`bench.run`) over a grid of token
counts and step counts, and plots speed-up / MAC reduction against tokens, one line per schedule and step count.

    python -m diffsparse.bench --sweep --threads 2 --json bench/sweep/sweep.json   # DiT-B/2, the grid below
    python -m diffsparse.bench --sweep --sweep-tokens 64,256 --sweep-steps 10 --rounds 1   # a quick one

Each cell is its own alternated bench (dense and the schedules take turns, one warm-up round), so a cell's ratios
are measured in one run; cells are not compared by their absolute times.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from tqdm.auto import tqdm

from diffsparse.evaluate.bench import run
from diffsparse.files import atomic_path

SWEEP_TOKENS = (64, 256, 1024)
SWEEP_STEPS = (10, 20, 50)
SWEEP_SCHEDULES = ("uniform-0.5", "uniform-0.75")
SWEEP_SIZE = "B/2"
FLOOR = 0.9  # the efficiency we aim for


def run_sweep(tokens=SWEEP_TOKENS, steps=SWEEP_STEPS, schedules=SWEEP_SCHEDULES, **bench_options) -> list[dict]:
    """`bench.run` at every (tokens, steps) of the grid (peak memory not measured); the rows of all cells."""
    rows = []
    cells = [(t, n) for t in tokens for n in steps]
    for t, n in tqdm(cells, desc="sweep", disable=not bench_options.get("progress", True)):
        rows += run(tokens=t, steps=n, schedule_names=schedules, memory=False, **bench_options)
    return rows


def sweep_table(rows: list[dict], floor: float = FLOOR) -> str:
    """The cached rows as a markdown table, efficiency below `floor` in bold."""
    lines = [
        "| tokens | steps | schedule | MAC reduction | speed-up (median, min-max) | efficiency |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["method"] == "dense":
            continue
        eff = f"{r['efficiency']:.2f}"
        lines.append(
            f"| {r['tokens']} | {r['steps']} | {r['method']} | {r['mac_reduction']:.2f}x | {r['speedup']:.2f}x "
            f"({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | {f'**{eff}**' if r['efficiency'] < floor else eff} |"
        )
    return "\n".join(lines)


def plot_sweep(rows: list[dict], path: Path, floor: float = FLOOR) -> None:
    """Efficiency against tokens (log scale), one line per (schedule, steps), `floor` dashed; written atomically."""
    cached = [r for r in rows if r["method"] != "dense"]
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for i, name in enumerate(sorted({r["method"] for r in cached})):
        for steps in sorted({r["steps"] for r in cached}):
            line = sorted((r["tokens"], r["efficiency"]) for r in cached if (r["method"], r["steps"]) == (name, steps))
            if line:
                tokens, efficiency = zip(*line, strict=True)
                style = ["-", "--", ":", "-."][i % 4]
                ax.plot(tokens, efficiency, style, marker="o", label=f"{name}, {steps} steps")
    ax.axhline(floor, color="grey", linewidth=0.8, linestyle=(0, (4, 4)))
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["tokens"] for r in cached}), [str(t) for t in sorted({r["tokens"] for r in cached})])
    ax.set_xlabel("image tokens")
    ax.set_ylabel("efficiency (speed-up / MAC reduction)")
    first = rows[0]
    ax.set_title(f"{first['model']}, batch {first['batch']}, {first['threads']} threads, {first['device']}")
    ax.legend(fontsize="small")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)

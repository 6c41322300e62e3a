"""Pareto sweeps, `python -m diffsparse.evaluate --budgets B1 B2 ...`: the whole evaluation at every budget, so
each method traces quality against measured speed-up as its budget grows.

Dense is sampled and measured once and shared by every budget; every requested method (and each `--schedule`
row: `NAME=PATH` at every budget, `NAME@B=PATH` at B only) is fitted to each budget, sampled from the same noise
and measured against dense as in a one-budget run. Wall-clock speed-ups come from one alternation (`timing.
alternate`) of dense with every row of every budget, so dense is timed once per round and the points of one plot
share the same rounds. Every budget is fitted before anything is sampled (one the hand-made schedules cannot meet
is refused first).

Outputs, in `--out`: budget-0.40/ etc. (each the one-budget outputs: results.md/.csv/.json, sample grids,
overview), pareto.md/.csv/.json (dense once, then one row per method and budget) and pareto_psnr.png /
pareto_l2.png (quality vs speed-up, one line per method across budgets, with its 95 % intervals).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from diffsparse.evaluate.budget import fit_schedules
from diffsparse.evaluate.cli import EvalConfig, budget_folder, schedules_at
from diffsparse.evaluate.harness import (
    Measured,
    Session,
    build_methods,
    finish,
    measure,
    start,
)
from diffsparse.evaluate.methods import Method
from diffsparse.evaluate.metrics import Estimate
from diffsparse.evaluate.results import (
    COLUMNS,
    DELTA_NOTE,
    OFF_BUDGET,
    allocator_clause,
    column_names,
    estimate_cell,
    flat_rows,
    write_tables,
)
from diffsparse.evaluate.timing import Speedup, alternate
from diffsparse.files import atomic_path

log = logging.getLogger(__name__)

DENSE_ROW = Speedup(1.0, 1.0, 1.0)


def budget_config(cfg: EvalConfig, budget: float) -> EvalConfig:
    """The one-budget config of a sweep's budget: that budget, its `--schedule` rows, its folder under --out."""
    return dataclasses.replace(cfg, budget=budget, budgets=[], schedules=schedules_at(cfg, budget),
                               output_dir=str(Path(cfg.output_dir) / budget_folder(budget)))  # fmt: skip


def sweep(cfg: EvalConfig, command: str = "") -> list[dict]:
    """Run the evaluation at every budget of `cfg.budgets`, dense shared; write each budget's outputs to
    `cfg.output_dir`/budget-B/ and the combined table and plots to `cfg.output_dir`. Returns the combined rows."""
    if not cfg.budgets:
        raise ValueError("cfg.budgets is empty: one budget is diffsparse.evaluate.harness.evaluate(cfg)")
    session = start(cfg)  # checks everything that needs no model first, then loads it
    configs = {b: budget_config(cfg, b) for b in cfg.budgets}
    fitted = {b: fit_schedules(c, session.runner) for b, c in configs.items()}  # every budget refused or fitted
    dense = measure(session, Method("dense", cfg.steps), None)
    measured: dict[float, list[Measured]] = {}
    for b, c in configs.items():
        methods = [m for m in build_methods(c, session.runner, fitted[b]) if m.name != "dense"]
        measured[b] = [measure(session, m, dense.images) for m in tqdm(methods, desc=f"budget {b:g}")]
    speedups = time_together(session, dense.method, measured)
    rows = {}
    for b, c in configs.items():
        rows[b] = finish(session, c, [dense.copy(), *measured[b]], [DENSE_ROW, *speedups[b]], command,
                         Path(c.output_dir))  # fmt: skip
    dense_row = dict(dense.row, budget=None, mac_reduction=1.0, **DENSE_ROW.as_row(), saved_macs=0.0,
                     off_budget=False)  # fmt: skip
    table = pareto_rows(dense_row, rows)
    write_pareto(table, cfg, command, Path(cfg.output_dir), session.conditions.description)
    return table


def time_together(session: Session, dense: Method, measured: dict[float, list[Measured]]) -> dict[float, list]:
    """Speed-ups of every row of every budget from one alternation: each round times dense once, then every row
    (after an untimed warm-up round of all); by budget, in the order of `measured`."""
    cfg, runner = session.cfg, session.runner
    count = min(cfg.timing_samples, cfg.samples)
    runs = {"dense": runner.timing_run(dense, count)}
    keys = {b: [f"{m.method.name} @ {b!r}" for m in ms] for b, ms in measured.items()}
    for b, ms in measured.items():
        runs.update({k: runner.timing_run(m.method, count) for k, m in zip(keys[b], ms, strict=True)})
    device = next(runner.ref.transformer.parameters()).device
    with tqdm(total=(cfg.rounds + 1) * len(runs), desc="timing") as bar:
        timings = alternate(runs, cfg.rounds, device=device, progress=bar.update)
    return {b: [timings.speedup(k) for k in ks] for b, ks in keys.items()}


def pareto_rows(dense_row: dict, rows: dict[float, list[dict]]) -> list[dict]:
    """Dense once, then each method's rows at every budget (ascending), methods in the order they first come."""
    by_method: dict[str, list[dict]] = {}
    for b in sorted(rows):
        for r in rows[b]:
            if r["method"] != "dense":
                by_method.setdefault(r["method"], []).append({"method": r["method"], "budget": b, **r})
    return [{"method": "dense", **dense_row}, *(r for items in by_method.values() for r in items)]


def write_pareto(rows: list[dict], cfg: EvalConfig, command: str, out: Path, conditions: str = "") -> None:
    """pareto.md/.csv/.json and the plots pareto_psnr.png and pareto_l2.png in `out`."""
    metrics = [c for c in COLUMNS if any(c in r for r in rows)]
    table = markdown(rows, metrics, cfg, command, conditions)
    write_tables(out, "pareto", flat_rows(rows, metrics), cfg, table)
    title = f"{cfg.model}, {cfg.sampler} {cfg.steps} steps, {cfg.samples} samples"
    plot(rows, "psnr", "PSNR vs dense (dB)", out / "pareto_psnr.png", title)
    plot(rows, "l2", "L2 vs dense (mean squared error)", out / "pareto_l2.png", title, log_scale=True)
    print(table)


def markdown(rows: list[dict], metrics: list[str], cfg: EvalConfig, command: str, conditions: str = "") -> str:
    """The combined table: one row per method and budget (dense once), 95 % intervals in brackets."""
    names = column_names(cfg.compare_to)
    header = ["method", "budget", "setting", "steps", "saved MACs", "MAC reduction", "speed-up (min-max)"]
    header += [names[c] for c in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r["method"], "all" if r["budget"] is None else percent(r["budget"]), r["setting"], str(r["steps"]),
            f"{r['saved_macs']:.1%}", f"{r['mac_reduction']:.2f}x" + (f" {OFF_BUDGET}" if r.get("off_budget") else ""),
            f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})",
        ]  # fmt: skip
        cells += [estimate_cell(r, c) for c in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    budgets, folders = ", ".join(map(percent, sorted(cfg.budgets))), ", ".join(map(budget_folder, sorted(cfg.budgets)))
    notes = (
        f"Budgets {budgets} of dense MACs saved (each budget's own table and samples: {folders}). "
        f"{cfg.samples} samples ({conditions}), {cfg.sampler} {cfg.steps} steps, guidance {cfg.guidance}, "
        f"selector {cfg.selector}, seed {cfg.seed}. Dense: sampled and timed once, shared by every budget. Speed-up: "
        f"median over {cfg.rounds} rounds of one alternation of dense with every row of every budget, on "
        f"{min(cfg.timing_samples, cfg.samples)} samples, {torch.get_num_threads()} threads{allocator_clause()}. "
        "Brackets: 95 % "
        "bootstrap intervals over samples"
        + (f"; {DELTA_NOTE.format(cfg.compare_to)}" if {"dfd", "dl2", "dpsnr"} & set(metrics) else ".")
        + (f" {OFF_BUDGET}: the row's MAC saving is more than {cfg.budget_tolerance:.0%} of dense MACs off its "
           "budget." if any(r.get("off_budget") for r in rows) else "")
    )  # fmt: skip
    return "\n".join([f"`{command}`" if command else "", "", *lines, "", notes, ""])


MARKERS = "osD^v<>ph*XP"
# 20 colours, no two methods of a plot alike: tab10, then tab20's lighter shades
COLORS = [*(f"C{i}" for i in range(10)), *(colormaps["tab20"](2 * i + 1) for i in range(10))]
LEARNED_COLORS = ("black", "0.5")


def replot(out: Path) -> None:
    """Draw pareto_psnr.png and pareto_l2.png again from `out`/pareto.json (as `write_pareto` wrote it)."""
    data = json.loads((Path(out) / "pareto.json").read_text())
    numbers = ("psnr", "l2")
    rows = [{**r, **{c: Estimate(r[c], r[f"{c}_low"], r[f"{c}_high"]) if isinstance(r.get(c), int | float) else None
                     for c in numbers}} for r in data["rows"]]  # fmt: skip
    cfg = data["config"]
    title = f"{cfg['model']}, {cfg['sampler']} {cfg['steps']} steps, {cfg['samples']} samples"
    plot(rows, "psnr", "PSNR vs dense (dB)", Path(out) / "pareto_psnr.png", title)
    plot(rows, "l2", "L2 vs dense (mean squared error)", Path(out) / "pareto_l2.png", title, log_scale=True)


def percent(budget: float) -> str:
    """A budget as the tables and plots say it: 40%, 42.5%."""
    return f"{100 * budget:.4g}%"


def plot(rows: list[dict], column: str, label: str, path: Path, title: str = "", log_scale: bool = False) -> None:
    """Quality `column` (an `Estimate`) against measured speed-up, one line per method through its budgets:
    95 % intervals as vertical bars, the min-max of the timing rounds as horizontal ones, rows off their budget
    hollow, each point labelled with its budget. Written whole or not at all."""
    fig = Figure(figsize=(9.0, 5.0))  # no pyplot: no backend or global figure state
    ax = fig.subplots()
    methods = list(dict.fromkeys(r["method"] for r in rows if r.get(column) is not None))
    learned = [m for m in methods if m.startswith("learned")]  # the rows the project is about: black, then grey
    others = [m for m in methods if m not in learned]
    for i, name in enumerate(methods):
        points = sorted((r for r in rows if r["method"] == name and r.get(column) is not None),
                        key=lambda r: r["budget"])  # fmt: skip
        x = [r["speedup"] for r in points]
        y = [r[column].value for r in points]
        xerr = [[r["speedup"] - r["speedup_min"] for r in points], [r["speedup_max"] - r["speedup"] for r in points]]
        yerr = [[r[column].value - r[column].low for r in points], [r[column].high - r[column].value for r in points]]
        bold = name in learned  # drawn heavier
        color = LEARNED_COLORS[learned.index(name) % 2] if bold else COLORS[others.index(name) % len(COLORS)]
        marker = MARKERS[i % len(MARKERS)]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, color=color, marker=marker, markersize=6 if bold else 5,
                    linewidth=2.4 if bold else 1.2, elinewidth=0.8, capsize=2.5, label=name)  # fmt: skip
        for r, xi, yi in zip(points, x, y, strict=True):
            if r.get("off_budget"):
                ax.plot([xi], [yi], marker=marker, markersize=5, color=color, markerfacecolor="white", zorder=3)
            ax.annotate(percent(r["budget"]), (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=6,
                        color=color)  # fmt: skip
    ax.axvline(1.0, color="0.6", linestyle=":", linewidth=1.0, label="dense (1x)")
    if log_scale:
        ax.set_yscale("log", nonpositive="clip")
    ax.set_xlabel("measured speed-up vs dense (median; bars: min-max over timing rounds)")
    ax.set_ylabel(f"{label}\n(bars: 95 % bootstrap interval)")
    ax.set_title(title + ("; hollow: off its budget" if any(r.get("off_budget") for r in rows) else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the plot: no point hidden
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)

"""Every family on one Pareto plot from two sweeps of the same learned schedules (same model, samples, seeds and
budgets): all rows of the first, and the rows of the second that the first does not have (its dense and learned
rows are the same samples, so their quality is the same; each row's speed-up is from its own sweep's alternation).

python bench/pareto-digits-ddim50-shifts-all/merge.py FIRST SECOND OUT
(FIRST, SECOND: the sweeps' --out folders, each with pareto.json; OUT gets pareto.json, pareto_psnr.png, pareto_l2.png)
Prints, per budget, the compared row (`--compare-to`) against every other: whether it is ahead on PSNR and on L2
with the paired interval leaving out zero, and its speed-up against the fastest row it beats (both as timed in
the same sweep's alternation).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffsparse.evaluate.pareto import replot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    first, second = (json.loads((folder / "pareto.json").read_text()) for folder in (args.first, args.second))
    for key in ("model", "steps", "samples", "seed", "budgets", "schedules"):
        if first["config"][key] != second["config"][key]:
            raise SystemExit(f"The sweeps differ in {key}: {first['config'][key]} against {second['config'][key]}.")
    have = {(r["method"], r["budget"]): r for r in first["rows"]}
    for r in second["rows"]:
        mine = have.get((r["method"], r["budget"]))
        if mine is not None and mine.get("psnr") != r.get("psnr"):
            raise SystemExit(f"{r['method']} at {r['budget']}: the sweeps' samples differ (PSNR).")
    name = first["config"]["compare_to"]
    for sweep in (first, second):  # each row's speed against the compared row's in the same alternation
        own = {r["budget"]: r["speedup"] for r in sweep["rows"] if r["method"] == name}
        for r in sweep["rows"]:
            r["compared_speedup"] = own.get(r["budget"])
    rows = [*first["rows"], *(r for r in second["rows"] if (r["method"], r["budget"]) not in have)]
    methods = list(dict.fromkeys([*first["config"]["methods"], *second["config"]["methods"]]))
    config = {**first["config"], "methods": methods, "output_dir": str(args.out)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pareto.json").write_text(json.dumps({"config": config, "rows": rows}, indent=1))
    replot(args.out)
    print(verdicts(rows, name))
    print(f"{len(rows)} rows, methods {', '.join(methods)}: {args.out}/pareto_psnr.png, pareto_l2.png")


def verdicts(rows: list[dict], name: str) -> str:
    """Per budget: `name`'s PSNR, L2 and speed-up; the rows it beats on both numbers beyond noise (Δ = row minus
    `name`: ΔPSNR's interval below 0 and ΔL2's above 0) and those it does not; the fastest row it beats."""
    lines = ["| budget | compared: PSNR, L2 (x1e-4), speed-up | beaten on both beyond noise | not | fastest beaten |",
             "|---|---|---|---|---|"]  # fmt: skip
    for budget in sorted({r["budget"] for r in rows if r["budget"] is not None}):
        at = [r for r in rows if r["budget"] == budget]
        mine = next(r for r in at if r["method"] == name)
        others = [r for r in at if r["method"] != name]
        beaten = [r for r in others if r["dpsnr_high"] < 0 and r["dl2_low"] > 0]
        # the beaten row that is fastest against the compared row, in the alternation that timed them both
        fastest = min(beaten, key=lambda r: r["compared_speedup"] / r["speedup"], default=None)
        ratio = "-"
        if fastest is not None:
            mine_there = fastest["compared_speedup"]
            ratio = (
                f"{fastest['method']} {fastest['speedup']:.2f}x against {mine_there:.2f}x "
                f"(ratio {mine_there / fastest['speedup']:.2f})"
            )
        missed = ", ".join(r["method"] for r in others if r not in beaten) or "none"
        lines.append(
            f"| {budget} | {mine['psnr']:.2f} dB, {1e4 * mine['l2']:.2f}, {mine['speedup']:.2f}x | "
            f"{len(beaten)} of {len(others)} | {missed} | {ratio} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

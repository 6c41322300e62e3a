"""The schedule a recipe run held after one refinement pass, rebuilt from its exported schedule and metrics.json
by undoing the later passes' moves (a swap undoes itself; a shift later at t is undone by the shift earlier at t).

A pass is deterministic given the schedule it starts from, so the schedule after pass 1 of a two-pass run is the
one a one-pass run (`learn.refine_passes=1`) validates and exports, if it validates better than the unrefined one.

python bench/learn-recipe/shift/after_pass.py RUN_DIR PASS OUT.json
(RUN_DIR holds the run's schedule.json and metrics.json; PASS counts from 1; 0: the unrefined schedule)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from diffsparse.learn.moves import shifted, swapped
from diffsparse.schedule import Schedule


def undone(actions: np.ndarray, move) -> np.ndarray:
    """`actions` before `move` ((t, t + 1) or (t, "later" | "earlier")) was made."""
    t, kind = move
    if kind == t + 1:
        return swapped(actions, t)
    inverse = {"later": "earlier", "earlier": "later"}[kind]
    return dict(shifted(actions, t))[(t, inverse)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("stage", type=int, metavar="PASS")
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    refine = json.loads((args.run / "metrics.json").read_text())["refine"]
    if not refine["kept"] or not 0 <= args.stage <= len(refine["passes"]):
        raise SystemExit(f"{args.run}: refinement kept={refine['kept']}, {len(refine['passes'])} pass(es) recorded.")
    exported = Schedule.load(args.run / "schedule.json")
    kept = [tuple(m) for m in refine["moves"]]
    wanted = [tuple(m) for m in refine["passes"][args.stage - 1]["moves"]] if args.stage else []
    if kept[: len(wanted)] != wanted:
        raise SystemExit(f"{args.run}: the exported moves do not begin with pass {args.stage}'s.")
    actions = exported.action_indices()
    for move in reversed(kept[len(wanted) :]):
        actions = undone(actions, move)
    meta = {**exported.meta, "refined_moves": len(wanted), "rebuilt_after_pass": args.stage}
    Schedule.from_actions(actions, exported.units, meta).save(args.out)
    val = refine["passes"][args.stage - 1]["val"] if args.stage else refine["val_before"]
    print(f"{args.out}: {len(wanted)} moves, validation {val}")


if __name__ == "__main__":
    main()

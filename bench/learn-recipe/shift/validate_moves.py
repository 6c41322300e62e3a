"""Validation L2 of schedules and of moves made on them, on a recipe's 64 validation conditions (what the
refinement's validation check compares), for any model: how the shift check was chosen.

python bench/learn-recipe/shift/validate_moves.py MODEL BUDGET NAME=SCHEDULE.json[:MOVE...] [...]
MODEL: a name (reference, digits_flux) or a folder; MOVE: sT (swap steps T and T+1), TL / TE (shift the steps
from T on one step later / earlier), applied in order. The unrefined schedule of a recipe run:
python bench/learn-recipe/shift/after_pass.py RUN_DIR 0 OUT.json
"""

from __future__ import annotations

import argparse

import torch

from diffsparse.learn.data import ConditionDataModule
from diffsparse.learn.module import ScheduleLearner
from diffsparse.learn.moves import shifted, swapped
from diffsparse.learn.recipe import RECIPE_DATA, RECIPE_LEARN
from diffsparse.models.loading import run_settings
from diffsparse.schedule import Schedule


def moved(schedule: Schedule, moves: list[str]) -> Schedule:
    actions = schedule.action_indices()
    for move in moves:
        if move.startswith("s"):
            actions = swapped(actions, int(move[1:]))
        else:
            t, way = int(move[:-1]), {"L": "later", "E": "earlier"}[move[-1]]
            actions = dict(shifted(actions, t))[(t, way)]
    return Schedule.from_actions(actions, schedule.units, dict(schedule.meta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("budget", type=float)
    parser.add_argument("schedules", nargs="+", metavar="NAME=SCHEDULE.json[:MOVE...]")
    args = parser.parse_args()
    torch.set_num_threads(2)
    run = run_settings(args.model)
    learner = ScheduleLearner(model=args.model, sampler=run["sampler"], num_steps=run["num_steps"],
                              guidance=run["guidance"], budget=args.budget, selector="toca",
                              captions=run["captions"], **RECIPE_LEARN)  # fmt: skip
    learner.setup("fit")
    data = ConditionDataModule(num_classes=learner.num_classes, captions=run["captions"],
                               **{**RECIPE_DATA, "batch_size": 16})  # fmt: skip
    val = list(data.val_dataloader())
    for spec in args.schedules:
        name, rest = spec.split("=", 1)
        path, *moves = rest.split(":")
        score = float(learner.validation_scores(moved(Schedule.load(path), moves), val)[0])
        print(f"{name}: validation L2 {score:.4e}", flush=True)


if __name__ == "__main__":
    main()

"""Does a recipe run's validation gain hold on other noise? Scores schedules by the learner's own `val/l2` path
(`ScheduleLearner.validation_scores` with `learn.judge=l2`: the inference path, L2 against the dense samples on
[-1, 1]) on the recipe's validation conditions and on held-out ones (the evaluation's seeds 0..N-1, classes
cycling), beside the recipe's start fitted to the budget.

python bench/learn-recipe/val_vs_test.py BUDGET START NAME=SCHEDULE.json [NAME=SCHEDULE.json ...] [--held-out N]
(the shipped reference model, 50 DDIM steps, the recipe's settings; START: a name of the recipe's starts)
"""

from __future__ import annotations

import argparse

import torch

from diffsparse.cache.control import set_soft_choice
from diffsparse.learn.data import ConditionDataModule
from diffsparse.learn.module import ScheduleLearner
from diffsparse.learn.recipe import RECIPE_DATA, RECIPE_LEARN
from diffsparse.schedule import Schedule


def per_sample_l2(learner: ScheduleLearner, schedule: Schedule, batches) -> torch.Tensor:
    """Each condition's L2 against the dense sample: `validation_scores` (judge l2) is their mean."""
    out = []
    for batch in batches:
        conditions, noise, target = learner._inputs(batch)
        set_soft_choice(learner.transformer, schedule, None)
        with torch.no_grad():
            out.append((learner._rollout(conditions, noise) - target).pow(2).flatten(1).mean(1))
    return torch.cat(out)


def scores(l2: torch.Tensor) -> str:
    """Mean L2, and mean PSNR on [-1, 1] images (peak 2): what the evaluation's PSNR averages, per sample."""
    psnr = (10 * torch.log10(4.0 / l2)).mean()
    return f"{l2.mean() * 1e4:.4f}e-4, {psnr:.2f} dB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("budget", type=float)
    parser.add_argument("start", help="one of the recipe's starts, scored as fitted to the budget")
    parser.add_argument("schedules", nargs="+", metavar="NAME=SCHEDULE.json")
    parser.add_argument("--held-out", type=int, default=128, help="held-out conditions (seeds 0..N-1)")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(2)
    learner = ScheduleLearner(model="reference", sampler="ddim", num_steps=50, budget=args.budget,
                              selector="toca", **RECIPE_LEARN)  # fmt: skip
    learner.setup("fit")
    data = ConditionDataModule(num_classes=learner.num_classes, **{**RECIPE_DATA, "batch_size": args.batch})
    val = list(data.val_dataloader())
    seeds = torch.arange(args.held_out)
    held_out = [{"class_labels": s % learner.num_classes, "seed": s} for s in seeds.split(args.batch)]
    rows = {f"start ({args.start}, fitted)": learner.starts[args.start]}
    rows |= {name: Schedule.load(path) for name, path in (s.split("=", 1) for s in args.schedules)}
    print(f"| schedule | validation ({RECIPE_DATA['val_size']}): L2, PSNR | held-out ({args.held_out}): L2, PSNR |")
    print("|---|---|---|")
    for name, schedule in rows.items():
        v, h = per_sample_l2(learner, schedule, val), per_sample_l2(learner, schedule, held_out)
        print(f"| {name} | {scores(v)} | {scores(h)} |", flush=True)


if __name__ == "__main__":
    main()

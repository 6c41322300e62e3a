"""The probe behind `learn/refine.py`, as it was run: the validation L2 (the recipe's 64 validation conditions,
50 DDIM steps) of forecast-FORA with interval 2 on the reference model, and of each schedule made from it by
moving one full step by one step, as a ratio to it. Output: moves.log.

python bench/refine-moves/probe.py reference 0.5 > bench/refine-moves/moves.log   (about 6 min, 2 threads)
"""

import sys

import numpy as np
import torch

from diffsparse.cache import apply_token_cache, remove_token_cache
from diffsparse.learn.data import ConditionDataModule
from diffsparse.learn.module import ScheduleLearner
from diffsparse.learn.recipe import RECIPE_DATA, RECIPE_LEARN
from diffsparse.schedule import Schedule

torch.set_num_threads(2)
model = sys.argv[1] if len(sys.argv) > 1 else "reference"
budget = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
L = ScheduleLearner(model=model, budget=budget, **{**RECIPE_LEARN, "starts": ["forecast_fora"]})
dm = ConditionDataModule(num_classes=L.num_classes, **{**RECIPE_DATA, "batch_size": 32})
dm.setup("fit")
batches = list(dm.val_dataloader())
L.setup("fit")
units, T, table = L.units, len(L.timesteps), L.table


def ev(name, s, order=1, quiet=False):
    remove_token_cache(L.transformer)
    apply_token_cache(L.transformer, s, selector="toca", forecast_order=order)
    l2 = float(L.validation_scores(s, batches)[0])  # learn.judge=l2
    if not quiet:
        print(f"{name:20s} o{order} saved={table.saved_fraction(s):.4f} val_l2={l2 * 1e4:.4f}e-4", flush=True)
    return l2


def sched(full):
    grid = np.ones((T, len(units)))
    grid[sorted(full)] = 0.0
    return Schedule(grid, units, {}).with_forecast(True)


base = list(range(0, T, 2))
b = ev("base", sched(base))
for i, t in enumerate(base[1:], 1):
    for d in (-1, 1):
        f = list(base)
        f[i] = t + d
        if f[i] in base or f[i] >= T:
            continue
        l2 = ev(f"move {t}->{t + d}", sched(f), quiet=True)
        print(f"move {t}->{t + d}: {l2 / b:.3f}", flush=True)

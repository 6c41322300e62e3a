"""`python -m diffsparse.evaluate --learn`: the learned schedule of every budget, made by the recipe
(`diffsparse.learn.recipe`, what `train.py experiment=learn` runs) before the evaluation, as `--schedule` rows."""

from __future__ import annotations

import logging
from pathlib import Path

from diffsparse.evaluate.cli import EvalConfig, budget_folder, budgets_of, model_defaults
from diffsparse.learn.recipe import learn_recipe
from diffsparse.models.loading import load_model

log = logging.getLogger(__name__)

LEARNED_ROW = "learned"


def learned_rows(cfg: EvalConfig) -> list[str]:
    """Learn a schedule for `cfg.model` at each budget of the run (with its steps, sampler, guidance, selector and
    captions) into `cfg.output_dir`/learned-B/; returns the `--schedule` items of the rows (`learned@B=PATH`).

    With `--budget-unit time` every budget's learner and the hand-made rows use one time table: `--time-table`, or
    the one the first learner measures (then set as `cfg.time_table`)."""
    sampler, selector = model_defaults(load_model(cfg.model), cfg)
    items, table = [], cfg.time_table
    for budget in budgets_of(cfg):
        out = Path(cfg.output_dir) / budget_folder(budget).replace("budget-", "learned-", 1)
        log.info("learning a schedule at budget %g with the recipe into %s", budget, out)
        path = learn_recipe(cfg.model, budget, out, num_steps=cfg.steps, sampler=sampler, guidance=cfg.guidance,
                            selector=selector, captions=cfg.captions, seed=cfg.seed, budget_unit=cfg.budget_unit,
                            time_table=table)  # fmt: skip
        if cfg.budget_unit == "time":
            table = table or str(out / "time_table.json")  # measured by the first budget's learner: reused
        items.append(f"{LEARNED_ROW}@{budget:g}={path}" if cfg.budgets else f"{LEARNED_ROW}={path}")
    cfg.time_table = table
    return items

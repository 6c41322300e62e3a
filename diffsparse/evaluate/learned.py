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
    captions) into `cfg.output_dir`/learned-B/; returns the `--schedule` items of the rows (`learned@B=PATH`)."""
    sampler, selector = model_defaults(load_model(cfg.model), cfg)
    items = []
    for budget in budgets_of(cfg):
        out = Path(cfg.output_dir) / budget_folder(budget).replace("budget-", "learned-", 1)
        log.info("learning a schedule at budget %g with the recipe into %s", budget, out)
        path = learn_recipe(cfg.model, budget, out, num_steps=cfg.steps, sampler=sampler, guidance=cfg.guidance,
                            selector=selector, captions=cfg.captions, seed=cfg.seed)  # fmt: skip
        items.append(f"{LEARNED_ROW}@{budget:g}={path}" if cfg.budgets else f"{LEARNED_ROW}={path}")
    return items

"""The one recommended recipe for learning a schedule on any model, in Python: what
`python train.py experiment=learn model=... learn.budget=B` runs (conf/experiment/learn.yaml holds the same
settings; a test keeps the two equal), for callers without Hydra (`python -m diffsparse.evaluate --learn`).

It starts from the hand-made schedules fitted to the budget (`RECIPE_STARTS`: ToCa, FORA, forecast-FORA,
forecast-FORA after TaylorSeer's 3-step warm-up, uniform), keeps the one that validates best on the validation
conditions (their own noise seeds), learns actions (a level of S, and copy or forecast for the reused tokens) from
it with the L2 loss against the dense samples, and exports the best validated schedule, refined by up to two passes
of moves (the best shift of the later steps, then neighbouring-step swaps; `refine.py`) judged by rollouts on every
training condition (the best-validating pass kept, only if it validates better): never one that validates worse
than that start. Its settings were chosen on two models (the reference DiT and a second DiT of another width,
depth and noise schedule), not on one; the warm-up start and the shift's validation check were added after a
third, the FLUX digits model, and re-checked on the other two.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from diffsparse.learn.data import ConditionDataModule
from diffsparse.learn.export import ScheduleExport
from diffsparse.learn.module import RECIPE_STARTS, ScheduleLearner

# `learn.*` of conf/experiment/learn.yaml
RECIPE_LEARN = {
    "loss": "l2",
    "stage": 1,
    "num_full": None,
    "starts": list(RECIPE_STARTS),
    "forecast": True,
    "forecast_order": 1,
    "lr": 0.2,
    "refine_passes": 2,
    "refine_size": 96,
    "refine_moves": ["swap", "shift"],
    "judge": "l2",
}
# `data.*` and `trainer.max_epochs` of conf/experiment/learn.yaml
RECIPE_DATA = {"train_size": 96, "val_size": 64, "batch_size": 8}
RECIPE_EPOCHS = 2


def learn_recipe(
    model: str | dict,
    budget: float,
    out_dir: str | Path,
    num_steps: int = 50,
    sampler: str = "ddim",
    guidance: float | None = None,
    selector: str = "toca",
    captions: str | None = None,
    max_epochs: int = RECIPE_EPOCHS,
    seed: int = 0,
    budget_unit: str = "macs",
    time_table: str | None = None,
) -> Path:
    """Learn a schedule for `model` at `budget` (fraction of dense MACs to save, or of time with
    `budget_unit="time"`: `time_table`, a saved table to reuse, else measured here) with the recipe; returns the
    path of the exported `schedule.json` in `out_dir` (beside it: metrics.json, the heatmap, the CSV log, and for a
    time budget time_table.json)."""
    out = Path(out_dir)
    L.seed_everything(seed, workers=True)
    options = {"budget_unit": budget_unit, "time_table": time_table}
    options |= {} if guidance is None else {"guidance": guidance}
    learner = ScheduleLearner(model=model, sampler=sampler, num_steps=num_steps, budget=budget, selector=selector,
                              captions=captions, **RECIPE_LEARN, **options)  # fmt: skip
    data = ConditionDataModule(num_classes=learner.num_classes, captions=captions, **RECIPE_DATA)
    best = ModelCheckpoint(dirpath=out / "checkpoints", filename="{epoch}", monitor="val/score", mode="min",
                           save_top_k=1, save_last=True, enable_version_counter=False)  # fmt: skip
    trainer = L.Trainer(default_root_dir=out, accelerator="auto", devices=1, max_epochs=max_epochs,
                        log_every_n_steps=1, enable_model_summary=False, callbacks=[best, ScheduleExport(out)],
                        logger=CSVLogger(out, name="logs"))  # fmt: skip
    trainer.fit(learner, data)
    if trainer.interrupted:
        raise SystemExit(f"Learning at budget {budget} was interrupted; no schedule was exported.")
    return out / "schedule.json"

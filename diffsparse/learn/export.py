"""Exporting a learned schedule when training ends: a rank-zero Lightning callback and the files it writes.

The exported costs are those of the best checkpoint (`trainer.checkpoint_callback`: the lowest `val/score`,
the hard schedule on held-out conditions), or the last ones when validation never ran. When the learner chose among
several hand-made starts, the chosen start is exported instead if it validated at least as well as the best checkpoint:
a learned schedule never validates worse than its start. With `learn.refine_passes`, that schedule is exported,
then refined by moving steps' actions (`refine.refine_schedule`) and exported again if the refined one
validates better.
"""

from __future__ import annotations

import resource
import shutil
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from safetensors.torch import save_file

from diffsparse.accounting.times import TimeTable
from diffsparse.files import write_json
from diffsparse.learn.losses import JUDGE_PARTS
from diffsparse.learn.module import ScheduleLearner
from diffsparse.learn.refine import refine_schedule
from diffsparse.schedule import Schedule


def export_schedule(learner: ScheduleLearner, out_dir: str | Path, schedule: Schedule | None = None) -> dict:
    """Write the learner's schedule (or `schedule`), its costs (`costs.safetensors`) and the heatmap (`schedule.png`)
    to `out_dir`; return where the schedule is, the MACs it saves and its full steps."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if schedule is None:
        schedule, _ = learner.choice()
    saved = learner.macs.saved_fraction(schedule)
    meta = {**schedule.meta, "saved_macs": saved}
    timed = isinstance(learner.table, TimeTable)
    if timed:  # a time budget: the predicted saving, and where the table was measured (ScheduleExport saves it)
        meta.update(saved_time_predicted=learner.table.saved_fraction(schedule), time_table=learner.table.meta)
    schedule = Schedule(schedule.grid, schedule.units, meta, schedule.forecast)
    schedule.save(out / "schedule.json")
    tensors = {"layer_costs": learner.layer_costs().detach().contiguous()}
    if learner.step_logits is not None:
        tensors["step_costs"] = learner.step_logits.detach().softmax(-1).contiguous()
    save_file(tensors, out / "costs.safetensors")
    method = schedule.meta.get("method", "learned")
    title = f"{method}, stage {learner.hparams.stage}: saves {saved:.1%} of MACs"
    if timed:
        title += f", {meta['saved_time_predicted']:.1%} of time (predicted)"
    schedule.plot(out / "schedule.png", title=title)
    result = {"schedule": str(out / "schedule.json"), "saved_macs": saved, "full_steps": schedule.full_steps,
              "forecast_share": float(schedule.forecast.mean())}  # fmt: skip
    if timed:
        result["saved_time_predicted"] = meta["saved_time_predicted"]
    return result


class ScheduleExport(L.Callback):
    """At the end of `fit`, on rank 0: the best checkpoint's schedule, costs and heatmap (`export_schedule`), that
    checkpoint copied to `stage{N}.ckpt`, and `metrics.json` (what `export_schedule` returns, the `judge` and the best
    checkpoint's validation score under it, `best_val`, what was `exported`, `refine` (what the refinement did),
    `minutes` since the run began and the process's peak resident memory during training, `peak_rss_mb`).

    Args:
        out_dir: the folder the files go to (the run's output directory).

    Example:
        >>> best = ModelCheckpoint(dirpath=out / "checkpoints", monitor="val/score", mode="min", save_last=True)
        >>> trainer = L.Trainer(callbacks=[best, ScheduleExport(out)])
    """

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self._start = time.perf_counter()

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.json"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._start = time.perf_counter()
        best = trainer.checkpoint_callback
        if best is not None and best.monitor != "val/score":  # else the start and the epochs are scored apart
            raise ValueError(
                f"The checkpoint callback monitors {best.monitor}, and the learner's start is scored by its judge "
                "(learn.judge), which it logs as val/score: set the monitor to val/score "
                "(conf/callbacks/model_checkpoint.yaml does)."
            )

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: ScheduleLearner) -> None:
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # of training, before the reload
        best = trainer.checkpoint_callback
        learner, best_score = pl_module, None
        overrides = {}
        if isinstance(pl_module.table, TimeTable):  # beside the schedule, and what the reloaded costs' DP reads
            self.out_dir.mkdir(parents=True, exist_ok=True)
            pl_module.table.save(self.out_dir / "time_table.json")
            overrides["time_table"] = str(self.out_dir / "time_table.json")
        if best is not None and best.best_model_path:
            learner = ScheduleLearner.load_from_checkpoint(best.best_model_path, map_location="cpu", **overrides)
            shutil.copy(best.best_model_path, self.out_dir / f"stage{learner.hparams.stage}.ckpt")
            best_score = best.best_model_score
        start = pl_module.start
        best_score = float(best_score) if best_score is not None else None
        kept_start = start is not None and (best_score is None or start["val_score"] <= best_score)
        chosen = None
        if kept_start:
            chosen = pl_module.start_schedule()
            chosen = Schedule(chosen.grid, chosen.units, {**chosen.meta, "kept_start": True}, chosen.forecast)
        metrics = {"judge": pl_module.hparams.judge, "best_val": best_score}
        if start is not None:
            metrics.update(start=start["name"], start_val=start["val_score"], start_scores=start["scores"],
                           exported="start" if kept_start else "learned")  # fmt: skip
        exported = export_schedule(learner, self.out_dir, chosen)
        self._write(exported, chosen, metrics, peak_rss_mb)
        hp = pl_module.hparams
        if hp.refine_passes > 0 and trainer.datamodule is not None:
            # written first, so that a failed or interrupted refinement leaves the learned schedule exported
            chosen = chosen if chosen is not None else learner.choice()[0]
            data, began = trainer.datamodule, time.perf_counter()
            pl_module.to(next(pl_module.transformer.parameters()).device)  # Lightning's teardown moved it to the CPU
            chosen, report = refine_schedule(pl_module.validation_scores, chosen, data.train_dataloader(),
                                             data.val_dataloader(), passes=hp.refine_passes, size=hp.refine_size,
                                             batch=hp.refine_batch, rollouts=pl_module,
                                             parts=JUDGE_PARTS[hp.judge],
                                             moves=tuple(hp.refine_moves))  # fmt: skip
            report["minutes"] = round((time.perf_counter() - began) / 60, 2)
            metrics["refine"] = report
            if report["kept"]:  # else the files written above stand; only metrics.json gains the report
                metrics["exported"] = f"{metrics.get('exported', 'learned')} + {len(report['moves'])} moves"
                exported = export_schedule(learner, self.out_dir, chosen)
            self._write(exported, chosen, metrics, peak_rss_mb)

    def _write(self, exported: dict, chosen: Schedule | None, metrics: dict, peak_rss_mb: float) -> None:
        """Write metrics.json: what `export_schedule` returned for `chosen` (None: the learner's choice),
        `metrics`, and the minutes since the run began."""
        metrics = {**exported, **metrics}
        if chosen is not None and (chosen.meta.get("kept_start") or chosen.meta.get("refined_moves")):
            metrics["costs"] = "costs.safetensors and the checkpoints hold the learned costs, not this schedule's"
        minutes = (time.perf_counter() - self._start) / 60
        metrics.update(minutes=round(minutes, 2), peak_rss_mb=peak_rss_mb)
        write_json(self.metrics_path, metrics)

"""Learning a schedule (DiffSparse Algorithm 1) as a `LightningModule` whose only parameters are costs.

Each training step: costs -> DP choice of an action per (step, unit) under the budget (a level of S, and for the
reused tokens copy or forecast) -> straight-through one-hot -> a student rollout in training mode (every unit
blends fresh, copied and forecast tokens through the chosen nested masks) -> loss against the dense teacher's
samples from the same noise -> gradients into the costs. The model stays frozen.

The costs start from a hand-made schedule fitted to the budget: with several `starts`, the one whose hard schedule
validates best (on the validation conditions, their own noise seeds) before any training. Stage 1 also learns step
costs (T x 2, full or not). By default the DP chooses the full steps under the budget: a step's cost of being full
lowers the "compute all" cost of every unit at that step (a weakness: at a step the DP made full, the layer choice
is "compute all" too, so its step costs get no gradient). With `num_full` set, a step DP picks that many full steps
and the layer DP fills the others. Stage 2 starts from a stage-1 checkpoint: "compute all" at its full steps lowered
by `delta` (eq. 9), the unified layer costs fine-tuned alone.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch import nn

from diffsparse.allocate import baselines
from diffsparse.allocate.solver import check_budget, pick_full_steps
from diffsparse.cache import apply_token_cache, cacheable_units, remove_token_cache
from diffsparse.cache.control import set_soft_choice, token_cache_paused
from diffsparse.learn.data import split_batch
from diffsparse.learn.losses import JUDGE_PARTS, make_loss, sample_errors
from diffsparse.learn.predictor import CostPredictor, choose, schedule_from_choice, straight_through, tie_broken
from diffsparse.learn.refine import check_refine_settings
from diffsparse.learn.settings import STAGE1_HOWTO, check_settings
from diffsparse.models.captions import load_captions, null_conditions
from diffsparse.models.loading import load_model
from diffsparse.models.sampling import initial_noise, sample
from diffsparse.reference.model import DEFAULT_GUIDANCE
from diffsparse.schedule import Schedule

# The settings that define the learning problem: a run can only be resumed (`ckpt_path`) with the same ones.
PROBLEM_SETTINGS = ("model", "sampler", "num_steps", "budget", "stage", "num_full", "loss", "selector", "guidance",
                    "forecast", "forecast_order", "budget_unit")  # fmt: skip
RECIPE_STARTS = ("toca", "fora", "forecast_fora", "forecast_warmup", "uniform")  # registry names, fitted to budget


def with_step_costs(costs: torch.Tensor, step_logits: torch.Tensor) -> torch.Tensor:
    """The DP's costs (T, U, |A|) when it chooses the full steps itself: each step's cost of being full minus that
    of not being full (`step_logits` (T, 2), softmax-normalised) added to "compute all" of every unit there."""
    step_costs = step_logits.to(costs.dtype).softmax(-1)
    costs = costs.clone()
    costs[:, :, 0] += (step_costs[:, 0] - step_costs[:, 1])[:, None]
    return costs


class ScheduleLearner(L.LightningModule):
    """Learns a (T x U) schedule for one model, sampler, step count and MAC budget.

    Args:
        model: a model name, folder or `model` config mapping (see `diffsparse.models.loading.load_model`).
        budget: fraction of the dense trajectory's MACs to save.
        stage: 1 (from hand-made starts) or 2 (unified layer costs, from `stage1_checkpoint`).
        num_full: full steps in stage 1 (the first step included), picked by learned step costs; default (None):
            the DP chooses how many steps are full, under the budget.
        starts: hand-made allocators (`allocate.registry` names) fitted to the budget; the costs start from the
            one that validates best. One name: that one, without validating.
        forecast: learn over every action of `levels.ACTIONS` (copy or forecast the reused tokens); False: the
            paper's levels with copy only.
        forecast_order: Taylor order of the forecast actions (1 or 2), saved in the schedule's meta.
        loss: `lpips`, `l2` or `ssim`.
        judge: how schedules are scored on the validation conditions (`losses.JUDGE_PARTS`): `l2`, `log_l2` or `both`
            (L2 for the start and the epochs, `val/score` in the logs; a refinement's swap must lower both).
        lr, step_lr: AdamW learning rates of the layer and the step costs.
        temperature: of the soft assignment that carries the straight-through gradient.
        dtype: of the rollouts and the costs. float32 gradients differ in their last bits with how a batch is
            split (over processes, say), which Adam can turn into different choices; float64 runs give the same
            schedule for any split, at about twice the time on a CPU.
        captions: caption embeddings (`diffsparse.captions`) for text-conditional models; their empty prompt is
            the unconditional half of guidance. The data module reads the conditions from the same file.
        checkpoint_steps: recompute each denoising step in the backward pass (the same gradients, bit for bit):
            reference model, stage 1: peak memory 3.1 GB instead of 5.1, 5.68 min instead of 3.82.
        refine_passes, refine_size, refine_batch, refine_moves: after training, passes of `refine_moves`
            (`moves.MOVES`) over the exported schedule (0: none) judged by rollouts on at most `refine_size`
            training conditions, `refine_batch` a rollout (run by the export); kept if it validates better.
        budget_unit: `macs` (the budget is a fraction of the dense MACs) or `time` (of the dense time, per action
            as measured on this device, dtype and `time_batch` CFG pairs, or loaded from `time_table`, a file that
            a time-budget run writes beside its schedule).
    """

    def __init__(
        self,
        model: str | dict = "reference",
        sampler: str = "ddim",
        num_steps: int = 50,
        budget: float = 0.5,
        stage: int = 1,
        num_full: int | None = None,
        loss: str = "l2",
        lr: float = 0.05,
        step_lr: float = 0.05,
        temperature: float = 0.1,
        guidance: float = DEFAULT_GUIDANCE,
        selector: str = "toca",
        delta: float = 10.0,
        stage1_checkpoint: str | None = None,
        dtype: str = "float32",
        captions: str | None = None,
        checkpoint_steps: bool = False,
        starts: list[str] | tuple[str, ...] = ("toca",),
        forecast: bool = False,
        forecast_order: int = 1,
        refine_passes: int = 0,
        refine_size: int = 64,
        refine_batch: int = 16,
        refine_moves: list[str] | tuple[str, ...] = ("swap",),
        budget_unit: str = "macs",
        time_table: str | None = None,
        time_batch: int = 20,
        judge: str = "l2",
    ):
        super().__init__()
        starts, refine_moves = list(starts), list(refine_moves)  # plain lists in the checkpoint, not ListConfig
        self.save_hyperparameters()
        check_settings(num_steps, budget, stage, num_full, stage1_checkpoint, budget_unit)
        check_refine_settings(refine_passes, refine_size, refine_batch, judge, refine_moves)
        self._ref = load_model(model)  # not a submodule: frozen, and kept out of checkpoints
        self._dtype = getattr(torch, dtype)
        for part in (self._ref.transformer, self._ref.vae):
            if part is not None and next(part.parameters()).dtype != self._dtype:
                part.to(self._dtype)
        transformer = self._ref.transformer
        if self._ref.text_conditioned:
            if captions is None:
                raise ValueError(f"{model} is text-conditional: pass caption embeddings (learn.captions=PATH).")
            self._ref.null_conditions = null_conditions(load_captions(captions)[0])
        self.units = cacheable_units(transformer)
        scheduler = self._ref.scheduler(sampler)
        scheduler.set_timesteps(num_steps)
        self.timesteps = scheduler.timesteps.tolist()
        self.macs = self._ref.mac_table()
        # what the budget counts: the MACs, or the time measured per action
        self.table = self._ref.budget_table(budget_unit, time_table, selector, time_batch, macs=self.macs)
        check_budget(budget, num_steps, self.table, budget_name="learn.budget", steps_name="learn.num_steps")
        fitted = baselines.budget_schedules(self.table, self.timesteps, budget)
        unknown = [name for name in starts if name not in fitted]
        if not starts or unknown:
            raise ValueError(f"learn.starts={starts}: choose one or more of {sorted(fitted)}.")
        if not forecast and any(fitted[name].forecast.any() for name in starts):
            raise ValueError(f"learn.starts={starts} has a forecasting start but learn.forecast=false: drop it.")
        # each start as the DP makes it from costs initialised to it: a hand-made schedule fitted to the budget may
        # save a little less than it, the DP's version saves at least the budget (and is where learning begins)
        self.starts = {name: self._projected(fitted[name]) for name in starts}
        self.start: dict | None = None  # the chosen start and its validation score (`choose_start`)
        init = fitted[starts[0]]
        self.layer_costs = CostPredictor(num_steps, len(self.units), init=init, forecast=forecast).to(self._dtype)
        self.num_full = num_full
        self.step_logits = None  # stage 1: (T, 2) costs of each step being full or not
        if stage == 1:
            logits = torch.zeros(num_steps, 2, dtype=self._dtype)
            logits[init.full_steps, 0] = -2.0  # the start's full steps start out cheap to keep full
            self.step_logits = nn.Parameter(logits)
        elif stage == 2:
            self._warm_start(stage1_checkpoint)
        self.loss_fn = make_loss(loss)
        self._teacher: dict[int, torch.Tensor] = {}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse to resume from a checkpoint of a different problem (`PROBLEM_SETTINGS`): its costs would be
        continued at this run's settings, or not fit them at all."""
        self.start = checkpoint.get("recipe_start", self.start)
        saved = checkpoint.get("hyper_parameters") or {}
        differ = [k for k in PROBLEM_SETTINGS if k in saved and k in self.hparams and saved[k] != self.hparams[k]]
        if differ:
            key = {k: k if k == "model" else f"learn.{k}" for k in differ}
            pairs = ", ".join(f"{key[k]}: {saved[k]!r} in the checkpoint, {self.hparams[k]!r} now" for k in differ)
            raise ValueError(
                f"The checkpoint was learned for another problem ({pairs}). Resume with the same settings, or "
                "start a new run without ckpt_path."
            )

    # --- costs -> schedule ----------------------------------------------------------------------------------------
    def _warm_start(self, checkpoint: str) -> None:
        """Stage 2 from stage 1: its layer costs, minus `delta` on "compute all" at its full steps (eq. 9)."""
        try:
            ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
        except Exception as e:  # not a torch checkpoint at all (a schedule JSON, say)
            message = f"learn.stage1_checkpoint={checkpoint} is not a Lightning checkpoint: {STAGE1_HOWTO}."
            raise ValueError(message) from e
        state = ckpt.get("state_dict", {}) if isinstance(ckpt, dict) else {}
        if "layer_costs.logits" not in state:
            raise ValueError(f"learn.stage1_checkpoint={checkpoint} holds no stage-1 costs: {STAGE1_HOWTO}.")
        saved = ckpt.get("hyper_parameters") or {}
        same = ("model", "sampler", "num_steps", "selector", "guidance")
        differ = [k for k in same if k in saved and saved[k] != self.hparams[k]]
        if differ:
            pairs = ", ".join(f"{k}: {saved[k]!r} in stage 1, {self.hparams[k]!r} now" for k in differ)
            raise ValueError(
                f"learn.stage1_checkpoint={checkpoint} was learned for another problem ({pairs}): stage 2 must "
                "keep stage 1's model, sampler, step count, selector and guidance."
            )
        logits = state["layer_costs.logits"].clone().to(self._dtype)
        if logits.shape != self.layer_costs.logits.shape:
            raise ValueError(
                f"learn.stage1_checkpoint={checkpoint} has costs over {logits.shape[-1]} choices, this run "
                f"{self.layer_costs.logits.shape[-1]}: keep stage 1's learn.forecast."
            )
        step_logits = state.get("step_logits")
        if step_logits is not None and saved.get("num_full"):
            full = pick_full_steps(step_logits.softmax(-1).double().numpy(), saved["num_full"])
        else:  # stage 1 let the DP choose its full steps: those of its schedule
            dp_costs = logits.softmax(-1)
            if step_logits is not None:
                dp_costs = with_step_costs(dp_costs, step_logits)
            levels = choose(dp_costs, saved.get("budget", self.hparams.budget), self.table).numpy()
            full = [int(t) for t in (levels == 0).all(axis=1).nonzero()[0]]
        logits[full, :, 0] -= self.hparams.delta
        with torch.no_grad():
            self.layer_costs.logits.copy_(logits)
        self.stage1_full_steps = full

    def full_steps(self) -> list[int] | None:
        if self.step_logits is None or self.num_full is None:
            return None
        return pick_full_steps(tie_broken(self.step_logits.softmax(-1)), self.num_full)

    def choice(self) -> tuple[Schedule, torch.Tensor]:
        """The DP's schedule for the current costs, and its straight-through one-hot (T, U, |S|)."""
        costs = self.layer_costs()
        full = self.full_steps()
        dp_costs = costs.detach().clone()
        if full is not None:
            dp_costs[full, :, 0] = -1e3  # full steps compute everything; the layer DP fills the rest
        elif self.step_logits is not None:
            dp_costs = with_step_costs(dp_costs, self.step_logits.detach())
        levels = choose(dp_costs, self.hparams.budget, self.table)
        h = straight_through(costs, levels, self.hparams.temperature)
        if full is None and self.step_logits is not None:
            full = [int(t) for t in (levels == 0).all(dim=1).nonzero().flatten()]
        if full is not None:
            step_costs = self.step_logits.softmax(-1)
            is_full = torch.ones(len(costs), dtype=torch.long, device=costs.device)
            is_full[full] = 0
            hs = straight_through(step_costs, is_full, self.hparams.temperature)
            compute_all = torch.nn.functional.one_hot(torch.zeros_like(levels), costs.shape[-1]).to(h.dtype)
            h = hs[:, 0, None, None] * compute_all + hs[:, 1, None, None] * h
        meta = self._meta({"method": "learned", "stage": self.hparams.stage, "budget": self.hparams.budget})
        return schedule_from_choice(levels, costs.shape[-1], self.units, meta), h

    def _meta(self, meta: dict) -> dict:
        """`meta`, the budget, and what the schedule runs with: its selector and forecast order."""
        order = {"forecast_order": self.hparams.forecast_order} if self.hparams.forecast else {}
        return {**meta, "budget": self.hparams.budget, "selector": self.hparams.selector, **order}

    # --- rollouts -------------------------------------------------------------------------------------------------
    @property
    def transformer(self) -> torch.nn.Module:
        return self._ref.transformer

    @property
    def num_classes(self) -> int:
        """The model's classes (0 for a text-conditional one): what the data module draws conditions from."""
        return self._ref.num_classes

    def setup(self, stage: str) -> None:
        self._ref.transformer.to(self.device)
        if self._ref.vae is not None:
            self._ref.vae.to(self.device)
        apply_token_cache(self.transformer, self.choice()[0], selector=self.hparams.selector,
                          forecast_order=self.hparams.forecast_order)  # fmt: skip

    def on_fit_start(self) -> None:
        """Choose the start (stage 1, several starts): after a checkpoint's restore, which brings its own."""
        if self.hparams.stage == 1 and len(self.starts) > 1 and self.start is None:
            self.choose_start(self.trainer.datamodule.val_dataloader())

    def _projected(self, start: Schedule) -> Schedule:
        """`start` as the DP gives it back under the budget from costs initialised to it."""
        costs = CostPredictor(len(self.timesteps), len(self.units), init=start, forecast=self.hparams.forecast)()
        choice = choose(costs.detach(), self.hparams.budget, self.table)
        return schedule_from_choice(choice, costs.shape[-1], self.units, self._meta({**start.meta, "start": True}))

    def validation_scores(self, schedule: Schedule, batches) -> np.ndarray:
        """The judge's mean per-sample errors (one per `JUDGE_PARTS[judge]`) of `schedule`'s samples (the inference
        path) against the teacher's, over `batches`; the first is what `val/score` logs for an epoch."""
        errors = [self.resumed_scores(schedule, batch, None) * len(batch["seed"]) for batch in batches]
        return sum(errors) / max(sum(len(batch["seed"]) for batch in batches), 1)

    def choose_start(self, batches) -> dict:
        """Validate every start; restart the costs from the best. Returns {name: validation score}."""
        batches = list(batches)
        with torch.random.fork_rng(devices=[]):  # training draws the same numbers whatever was validated
            scores = {name: float(self.validation_scores(s, batches)[0]) for name, s in self.starts.items()}
        best = min(scores, key=scores.get)
        if self._trainer is not None:  # every process restarts from the same start (rank 0's)
            best = self.trainer.strategy.broadcast(best, src=0)
        self.layer_costs.restart(self.starts[best])
        if self.step_logits is not None:
            with torch.no_grad():
                self.step_logits.zero_()
                self.step_logits[self.starts[best].full_steps, 0] = -2.0
        self.start = {"name": best, "val_score": scores[best], "scores": scores, "judge": self.hparams.judge}
        return scores

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["recipe_start"] = self.start

    def start_schedule(self) -> Schedule | None:
        """The chosen start, fitted to the budget (None before `choose_start`)."""
        return None if self.start is None else self.starts[self.start["name"]]

    def teardown(self, stage: str) -> None:
        remove_token_cache(self.transformer)

    def _rollout(self, conditions: dict, noise: torch.Tensor, pause_at: int | None = None, resume=None):
        """Samples in image space (decoded through the VAE for latent models), differentiable in the choice; with
        `pause_at`, the loop paused before that step instead (`sampling.Paused`), which `resume` runs on."""
        ref, hp = self._ref, self.hparams
        null = ref.null_conditions
        if null is not None:
            null = {k: v.to(self.device) for k, v in null.items()}
        x = sample(
            self.transformer, ref.scheduler(hp.sampler), conditions, noise, hp.num_steps, hp.guidance,
            null_conditions=null, checkpoint_steps=hp.checkpoint_steps, pause_at=pause_at, resume=resume,
        )  # fmt: skip
        return x if pause_at is not None else ref.decode(x)

    def paused_rollout(self, schedule: Schedule, batch: dict, step: int, resume=None):
        """`schedule`'s rollout of `batch` (the inference path) paused before `step`, from `resume` (an earlier
        pause) if given: for scoring schedules that act the same before `step` without running those steps again."""
        conditions, noise, _ = self._inputs({k: v.to(self.device) for k, v in batch.items()})
        set_soft_choice(self.transformer, schedule, None)
        with torch.no_grad():
            return self._rollout(conditions, noise, pause_at=step, resume=resume)

    def resumed_scores(self, schedule: Schedule, batch: dict, resume) -> np.ndarray:
        """`validation_scores(schedule, [batch])`, with the rollout run on from `resume` if given (`paused_rollout` of
        a schedule that acts as `schedule` does before the pause)."""
        conditions, noise, target = self._inputs({k: v.to(self.device) for k, v in batch.items()})
        set_soft_choice(self.transformer, schedule, None)
        with torch.no_grad():
            student = self._rollout(conditions, noise, resume=resume)
        return np.array([float(sample_errors(student, target, p).mean()) for p in JUDGE_PARTS[self.hparams.judge]])

    def _noise(self, seeds: torch.Tensor) -> torch.Tensor:
        noise = torch.cat([initial_noise(1, self._ref.sample_shape, int(s)) for s in seeds])
        return noise.to(self.device, self._dtype)

    def teacher(self, conditions: dict, seeds: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Dense samples for these conditions, computed once per condition (noise seed) and kept."""
        missing = [i for i, s in enumerate(seeds.tolist()) if s not in self._teacher]
        if missing:
            idx = torch.tensor(missing, device=noise.device)
            with torch.no_grad(), token_cache_paused(self.transformer):
                x = self._rollout({k: v[idx] for k, v in conditions.items()}, noise[idx])
            for i, xi in zip(missing, x, strict=True):
                self._teacher[int(seeds[i])] = xi
        return torch.stack([self._teacher[int(s)] for s in seeds])

    def _inputs(self, batch):
        """(conditions in the learner's dtype, noise, the teacher's samples) of a batch."""
        conditions, seeds = split_batch(batch)
        conditions = {k: v.to(self._dtype) if v.is_floating_point() else v for k, v in conditions.items()}
        noise = self._noise(seeds)
        return conditions, noise, self.teacher(conditions, seeds, noise)

    def _prepare(self, batch):
        """(conditions, noise, the teacher's samples, the current schedule and its straight-through choice)."""
        return *self._inputs(batch), *self.choice()

    def training_step(self, batch, batch_idx):
        conditions, noise, target, schedule, h = self._prepare(batch)
        set_soft_choice(self.transformer, schedule, h)
        try:
            student = self._rollout(conditions, noise)
        finally:
            set_soft_choice(self.transformer, schedule, None)
        loss = self.loss_fn(student, target)
        self.log_dict(
            {"train/loss": loss, "train/saved_macs": float(self.macs.saved_fraction(schedule))},
            prog_bar=True, batch_size=len(noise),
        )  # fmt: skip
        return loss

    def validation_step(self, batch, batch_idx):
        """The hard schedule through the inference path, on conditions and noise not used in training."""
        conditions, noise, target, schedule, _ = self._prepare(batch)
        set_soft_choice(self.transformer, schedule, None)
        with torch.no_grad():
            student = self._rollout(conditions, noise)
        errors = {part: sample_errors(student, target, part).mean() for part in ("l2", "log_l2")}
        errors["score"] = errors[JUDGE_PARTS[self.hparams.judge][0]]  # what the checkpoint callback monitors
        for name, value in errors.items():
            self.log(f"val/{name}", value, prog_bar=name == "l2", batch_size=len(noise), sync_dist=True)
        self.log("val/loss", self.loss_fn(student, target), batch_size=len(noise), sync_dist=True)

    def configure_optimizers(self):
        groups = [{"params": self.layer_costs.parameters(), "lr": self.hparams.lr}]
        if self.step_logits is not None:
            groups.append({"params": [self.step_logits], "lr": self.hparams.step_lr})
        # eps 1e-6, not 1e-8: costs whose true gradient is 0 get float-noise gradients, which Adam would blow up
        # into full steps, different ones per process count (data-parallel runs must give the same schedule)
        return torch.optim.AdamW(groups, weight_decay=0.0, eps=1e-6)

"""Learning a schedule (DiffSparse Algorithm 1) as a `LightningModule` whose only parameters are costs.

Each training step: costs -> DP choice under the budget -> straight-through one-hot -> a student rollout in
training mode (every unit blends fresh and cached tokens through the chosen nested masks) -> loss against the
dense teacher's samples from the same noise -> gradients into the costs. The model stays frozen.

Stage 1 also learns step costs (T x 2) and picks `num_full` full steps with its own DP; the layer DP then fills
the other steps. Stage 2 starts from a stage-1 checkpoint: the layer costs' "compute all" entries at the chosen
full steps are lowered by `delta` (eq. 9) and the unified layer costs are fine-tuned alone.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import nn

from diffsparse.allocate import baselines
from diffsparse.allocate.solver import check_budget, check_num_steps, pick_full_steps
from diffsparse.cache import apply_token_cache, cacheable_units, remove_token_cache
from diffsparse.cache.control import set_soft_choice, token_cache_paused
from diffsparse.learn.data import split_batch
from diffsparse.learn.losses import make_loss
from diffsparse.learn.predictor import CostPredictor, choose, schedule_from_levels, straight_through, tie_broken
from diffsparse.models.captions import load_captions, null_conditions
from diffsparse.models.loading import load_model
from diffsparse.models.sampling import initial_noise, sample
from diffsparse.reference.model import DEFAULT_GUIDANCE
from diffsparse.schedule import Schedule

# The settings that define the learning problem: a run can only be resumed (`ckpt_path`) with the same ones.
PROBLEM_SETTINGS = ("model", "sampler", "num_steps", "budget", "stage", "num_full", "loss", "selector", "guidance")
STAGE1_HOWTO = (
    "run stage 1 first (`python train.py experiment=digits_stage1` writes <output_dir>/stage1.ckpt) and pass "
    "learn.stage1_checkpoint=PATH"
)


def _check_settings(num_steps, budget, stage, num_full, stage1_checkpoint) -> None:
    """Refuse settings that cannot work, before the model is loaded, with what to set instead."""
    if stage not in (1, 2):
        raise ValueError(f"learn.stage={stage}: choose learn.stage=1 (step and layer costs) or 2 (from stage 1).")
    check_num_steps(num_steps, "learn.num_steps")
    if not 0.0 < budget < 1.0:
        raise ValueError(
            f"learn.budget={budget}: the budget is the fraction of the dense MACs to save, so it must lie strictly "
            "between 0 and 1 (e.g. learn.budget=0.5)."
        )
    if num_full is not None and not 1 <= num_full <= num_steps:
        raise ValueError(
            f"learn.num_full={num_full}: the number of full steps must be in 1..learn.num_steps ({num_steps}); the "
            "first step is always full, so at least 1. Leave learn.num_full=null for ToCa's count at this budget."
        )
    if stage == 2:
        if stage1_checkpoint is None or stage1_checkpoint == "???":
            raise ValueError(f"learn.stage=2 starts from a stage-1 checkpoint, and none was given: {STAGE1_HOWTO}.")
        if not Path(stage1_checkpoint).is_file():
            raise ValueError(f"learn.stage1_checkpoint={stage1_checkpoint} is not a file: {STAGE1_HOWTO}.")


class ScheduleLearner(L.LightningModule):
    """Learns a (T x U) schedule for one model, sampler, step count and MAC budget.

    Args:
        model: a model name, folder or `model` config mapping (see `diffsparse.models.loading.load_model`).
        budget: fraction of the dense trajectory's MACs to save.
        stage: 1 (step and layer costs, `num_full` full steps) or 2 (unified layer costs, from `stage1_checkpoint`).
        num_full: full steps in stage 1 (the first step included); default: as many as the ToCa schedule that
            initialises the layer costs.
        loss: `lpips`, `l2` or `ssim`.
        lr, step_lr: AdamW learning rates of the layer and the step costs.
        temperature: of the soft assignment that carries the straight-through gradient.
        dtype: of the rollouts and the costs. float32 gradients differ in their last bits with how a batch is
            split (over processes, say), which Adam can turn into different choices; float64 runs give the same
            schedule for any split, at about twice the time on a CPU.
        captions: caption embeddings (`diffsparse.captions`) for text-conditional models; their empty prompt is
            the unconditional half of guidance. The data module reads the conditions from the same file.
        checkpoint_steps: recompute each denoising step in the backward pass instead of keeping its activations:
            the same gradients, bit for bit. For long trajectories and large models; on the reference model's
            stage 1 it cut peak memory from 5.1 to 3.1 GB and took 5.68 min instead of 3.82.
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
    ):
        super().__init__()
        self.save_hyperparameters()
        _check_settings(num_steps, budget, stage, num_full, stage1_checkpoint)
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
        self.table = self._ref.mac_table()
        check_budget(budget, num_steps, self.table, budget_name="learn.budget", steps_name="learn.num_steps")
        init = baselines.budget_schedules(self.table, self.timesteps, budget)["toca"]
        self.layer_costs = CostPredictor(num_steps, len(self.units), init=init).to(self._dtype)
        self.num_full = len(init.full_steps) if num_full is None else num_full
        self.step_logits = None
        if stage == 1:
            logits = torch.zeros(num_steps, 2, dtype=self._dtype)
            logits[init.full_steps, 0] = -2.0  # ToCa's full steps start out cheap to keep full
            self.step_logits = nn.Parameter(logits)
        else:
            self._warm_start(stage1_checkpoint)
        self.loss_fn = make_loss(loss)
        self._teacher: dict[int, torch.Tensor] = {}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse to resume from a checkpoint of a different problem (`PROBLEM_SETTINGS`): its costs would be
        continued at this run's settings, or not fit them at all."""
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
        if "step_logits" not in state or "layer_costs.logits" not in state:
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
        num_full = ckpt.get("hyper_parameters", {}).get("num_full") or self.num_full
        logits = state["layer_costs.logits"].clone().to(self._dtype)
        full = pick_full_steps(state["step_logits"].softmax(-1).double().numpy(), num_full)
        logits[full, :, 0] -= self.hparams.delta
        with torch.no_grad():
            self.layer_costs.logits.copy_(logits)
        self.stage1_full_steps = full

    def full_steps(self) -> list[int] | None:
        if self.step_logits is None:
            return None
        return pick_full_steps(tie_broken(self.step_logits.softmax(-1)), self.num_full)

    def choice(self) -> tuple[Schedule, torch.Tensor]:
        """The DP's schedule for the current costs, and its straight-through one-hot (T, U, |S|)."""
        costs = self.layer_costs()
        full = self.full_steps()
        dp_costs = costs.detach().clone()
        if full is not None:
            dp_costs[full, :, 0] = -1e3  # full steps compute everything; the layer DP fills the rest
        levels = choose(dp_costs, self.hparams.budget, self.table)
        h = straight_through(costs, levels, self.hparams.temperature)
        if full is not None:
            step_costs = self.step_logits.softmax(-1)
            is_full = torch.ones(len(costs), dtype=torch.long, device=costs.device)
            is_full[full] = 0
            hs = straight_through(step_costs, is_full, self.hparams.temperature)
            compute_all = torch.nn.functional.one_hot(torch.zeros_like(levels), costs.shape[-1]).to(h.dtype)
            h = hs[:, 0, None, None] * compute_all + hs[:, 1, None, None] * h
        meta = {"method": "learned", "stage": self.hparams.stage, "budget": self.hparams.budget}
        return schedule_from_levels(levels, self.units, meta), h

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
        apply_token_cache(self.transformer, self.choice()[0], selector=self.hparams.selector)

    def teardown(self, stage: str) -> None:
        remove_token_cache(self.transformer)

    def _rollout(self, conditions: dict, noise: torch.Tensor) -> torch.Tensor:
        """Samples in image space (decoded through the VAE for latent models), differentiable in the choice."""
        ref, hp = self._ref, self.hparams
        null = ref.null_conditions
        if null is not None:
            null = {k: v.to(self.device) for k, v in null.items()}
        x = sample(
            self.transformer, ref.scheduler(hp.sampler), conditions, noise, hp.num_steps, hp.guidance,
            null_conditions=null, checkpoint_steps=hp.checkpoint_steps,
        )  # fmt: skip
        return ref.decode(x)

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

    def _prepare(self, batch):
        """(conditions, noise, the teacher's samples, the current schedule and its straight-through choice)."""
        conditions, seeds = split_batch(batch)
        conditions = {k: v.to(self._dtype) if v.is_floating_point() else v for k, v in conditions.items()}
        noise = self._noise(seeds)
        return conditions, noise, self.teacher(conditions, seeds, noise), *self.choice()

    def training_step(self, batch, batch_idx):
        conditions, noise, target, schedule, h = self._prepare(batch)
        set_soft_choice(self.transformer, schedule, h)
        try:
            student = self._rollout(conditions, noise)
        finally:
            set_soft_choice(self.transformer, schedule, None)
        loss = self.loss_fn(student, target)
        self.log_dict(
            {"train/loss": loss, "train/saved_macs": float(self.table.saved_fraction(schedule))},
            prog_bar=True, batch_size=len(noise),
        )  # fmt: skip
        return loss

    def validation_step(self, batch, batch_idx):
        """The hard schedule through the inference path, on conditions and noise not used in training."""
        conditions, noise, target, schedule, _ = self._prepare(batch)
        set_soft_choice(self.transformer, schedule, None)
        with torch.no_grad():
            student = self._rollout(conditions, noise)
        l2 = torch.nn.functional.mse_loss(student, target)
        self.log("val/l2", l2, prog_bar=True, batch_size=len(noise), sync_dist=True)
        self.log("val/loss", self.loss_fn(student, target), batch_size=len(noise), sync_dist=True)

    def configure_optimizers(self):
        groups = [{"params": self.layer_costs.parameters(), "lr": self.hparams.lr}]
        if self.step_logits is not None:
            groups.append({"params": [self.step_logits], "lr": self.hparams.step_lr})
        # eps 1e-6, not 1e-8: costs whose true gradient is 0 get float-noise gradients, which Adam would blow up
        # into full steps, different ones per process count (data-parallel runs must give the same schedule)
        return torch.optim.AdamW(groups, weight_decay=0.0, eps=1e-6)

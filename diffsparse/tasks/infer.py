"""`python infer.py`: sample with a schedule (or a pruning plan) and report MACs, speed-up and fidelity."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from diffsparse.cache import cacheable_units
from diffsparse.evaluate.inference import resolve_schedule, run_inference, run_pruned_inference
from diffsparse.models.generate import check_classes
from diffsparse.models.handle import ModelHandle
from diffsparse.prune.plan import PrunePlan
from diffsparse.reference.model import SHIPPED_SCHEDULE
from diffsparse.tasks.common import check_complete, load_configured_model


def infer(cfg: DictConfig) -> dict:
    """Load the model, apply the schedule, sample, and report MACs and the measured speed-up against dense."""
    check_complete(cfg)
    pipe = load_configured_model(cfg)
    conditions = infer_conditions(cfg, pipe)
    if cfg.get("pruned"):
        return infer_pruned(cfg, pipe, conditions)
    units = cacheable_units(pipe.transformer)
    path = cfg.schedule
    if path == "shipped":
        if cfg.model.get("name_or_path") != "reference":
            raise ValueError(
                "schedule=shipped is the reference model's learned schedule. For this model pass "
                "schedule=PATH (from python train.py ...) or schedule=null sparsity=0.5 (uniform)."
            )
        path = str(SHIPPED_SCHEDULE)
    schedule = resolve_schedule(path, units, cfg.num_steps, cfg.sparsity)
    metrics = run_inference(
        pipe,
        schedule,
        conditions,
        selector=OmegaConf.to_container(cfg.selector) if isinstance(cfg.selector, DictConfig) else cfg.selector,
        seed=cfg.seed,
        rounds=cfg.rounds,
        guidance_scale=cfg.guidance_scale,
        output_dir=cfg.output_dir,
    )
    print(
        f"{schedule!r}\nMACs: dense {metrics['dense_gmacs']:.3f} G, cached {metrics['cached_gmacs']:.3f} G "
        f"({metrics['mac_reduction']:.2f}x fewer); measured speed-up {metrics['speedup']:.2f}x "
        f"(min {metrics['speedup_min']:.2f}, max {metrics['speedup_max']:.2f}, {cfg.rounds} rounds); "
        f"PSNR vs dense {metrics['psnr_vs_dense']:.2f} dB; samples (top: dense, bottom: cached): "
        f"{metrics.get('grid')}"
    )
    return metrics


def infer_conditions(cfg: DictConfig, ref: ModelHandle) -> list:
    """`conditions` of infer.py: as given, or one sample per class (at most 10) of a class-conditional model."""
    conditions = OmegaConf.to_container(cfg.conditions, resolve=True) if cfg.conditions is not None else None
    if conditions is None:
        if ref.text_conditioned:
            raise ValueError('This model is text-conditional: pass prompts, e.g. "conditions=[a photo of a cat]".')
        return list(range(min(ref.num_classes, 10)))
    if not isinstance(conditions, list) or not conditions:
        raise ValueError(f"conditions must be a non-empty list (class ids or prompts), got {conditions!r}.")
    if not ref.text_conditioned:
        check_classes(torch.as_tensor(conditions), ref.num_classes)
    return conditions


def infer_pruned(cfg: DictConfig, pipe, conditions: list) -> dict:
    """`infer` for a stage-wise pruning plan (`pruned=DIR`, from `python train.py experiment=prune_*`)."""
    plan = PrunePlan.load(cfg.pruned)
    planned_steps = int(plan.meta["num_steps"])
    if cfg.num_steps is not None and cfg.num_steps != planned_steps:
        raise ValueError(
            f"num_steps={cfg.num_steps}, but the pruning plan {cfg.pruned} routes weights for {planned_steps} steps "
            "(its stages are timestep ranges of that trajectory): leave num_steps unset, or make a plan for "
            f"{cfg.num_steps} steps (prune.num_steps={cfg.num_steps})."
        )
    planned_model, model = plan.meta.get("model"), OmegaConf.to_container(cfg.model, resolve=True)
    if isinstance(planned_model, dict) and planned_model != model:
        raise ValueError(
            f"The pruning plan {cfg.pruned} was made for the model {planned_model}, not {model}: its pruned weights "
            "belong to that model. Run it with the same model= setting, or prune this model."
        )
    metrics = run_pruned_inference(pipe, plan, conditions, cfg.seed, cfg.rounds, cfg.guidance_scale, cfg.output_dir)
    print(
        f"pruning plan {cfg.pruned}: {plan.store.method}, {plan.meta.get('schedule')}, stage levels "
        f"{plan.stage_levels} of {plan.store.levels}, {plan.meta['num_steps']} steps\n"
        f"MACs: dense {metrics['dense_gmacs']:.3f} G, pruned {metrics['pruned_gmacs']:.3f} G "
        f"({metrics['mac_reduction']:.2f}x fewer); measured speed-up {metrics['speedup']:.2f}x "
        f"(min {metrics['speedup_min']:.2f}, max {metrics['speedup_max']:.2f}, {cfg.rounds} rounds); "
        f"PSNR vs dense {metrics['psnr_vs_dense']:.2f} dB; samples (top: dense, bottom: pruned): {metrics.get('grid')}"
    )
    return metrics

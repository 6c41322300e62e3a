"""What `train.py` and `infer.py` run: instantiate from the Hydra config, run, return metrics."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .cache import cacheable_units
from .files import atomic_path
from .inference import resolve_schedule, run_inference
from .loading import load_model
from .models import example_inputs
from .pipelines import check_classes
from .reference import SHIPPED_SCHEDULE, Reference

log = logging.getLogger(__name__)

# What to set for a mandatory (`???`) config value, by its key.
MISSING_HINTS = {
    "learn.stage1_checkpoint": "the stage1.ckpt a stage-1 run writes into its output_dir "
    "(python train.py experiment=digits_stage1, then learn.stage1_checkpoint=<that output_dir>/stage1.ckpt)",
    "learn.captions": "caption embeddings for a text-conditional model (python -m diffsparse.captions --help)",
    "model.path": "the model's folder (a saved pipeline, or transformer/ with noise_schedule.json beside it)",
}


def check_complete(cfg: DictConfig) -> None:
    """Refuse a config with mandatory values left unset (`???`), saying what to set."""
    missing = sorted(_missing_keys(OmegaConf.to_container(cfg, resolve=False)))
    if missing:
        hints = "; ".join(f"{k}=... ({MISSING_HINTS[k]})" if k in MISSING_HINTS else f"{k}=..." for k in missing)
        raise ValueError(f"Missing mandatory settings: {', '.join(missing)}. Set {hints}.")


def _missing_keys(node, prefix: str = ""):
    """Dotted keys whose value is the `???` marker, read without resolving interpolations."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        if value == "???":
            yield f"{prefix}{key}"
        else:
            yield from _missing_keys(value, f"{prefix}{key}.")


def load_configured_model(cfg: DictConfig) -> Reference:
    """The model of the `model` config group (`model=NAME`, or `model=local model.path=DIR`)."""
    return load_model(OmegaConf.to_container(cfg.model, resolve=True))


def _mac_inputs(ref: Reference) -> dict:
    """Forward keywords to count one step's MACs on: the handle's probe (a CFG pair), or random text embeddings
    for a text-conditional model whose empty prompt has not been encoded."""
    if ref.text_conditioned and ref.null_conditions is None:
        return example_inputs(ref.transformer, batch=2)
    return ref.probe_inputs()


def make_schedule(cfg: DictConfig) -> dict:
    """Build a schedule with the configured allocator, export it (JSON + heatmap PNG) and report its MACs."""
    check_complete(cfg)
    ref = load_configured_model(cfg)
    units = cacheable_units(ref.transformer)
    schedule = instantiate(cfg.allocator)(units=units, num_steps=cfg.num_steps)
    macs = schedule.macs(ref.transformer, **_mac_inputs(ref))
    out = Path(cfg.output_dir)
    path = schedule.save(out / "schedule.json")
    schedule.plot(out / "schedule.png")
    metrics = {
        "schedule": str(path),
        "mean_sparsity": schedule.mean_sparsity(),
        "mac_reduction": macs["reduction"],
        "full_steps": schedule.full_steps,
    }
    log.info("schedule written to %s: %s", path, json.dumps(metrics))
    return metrics


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


def infer_conditions(cfg: DictConfig, ref: Reference) -> list:
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
    from .inference import run_pruned_inference
    from .prune.plan import PrunePlan

    plan = PrunePlan.load(cfg.pruned)
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


def train_reference_model(cfg: DictConfig) -> dict:
    """Train the feature network and the reference DiT into `output_dir`, then write the model card."""
    from .featurenet import train_feature_net
    from .modelcard import write_card
    from .reference import train_reference

    out = Path(cfg.output_dir)
    feature_net = train_feature_net(out / "digits_classifier", epochs=cfg.feature_net_epochs, seed=cfg.seed)
    recipe = train_reference(
        out / "digits_dit",
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup=cfg.warmup,
        ema_decay=cfg.ema_decay,
        label_dropout=cfg.label_dropout,
        seed=cfg.seed,
    )
    card = write_card(
        out / "digits_dit",
        out / "digits_classifier",
        cfg.card.sweep_samples,
        steps=cfg.card.steps,
        samples=cfg.card.samples,
    )
    return {"feature_net": feature_net, "reference": recipe, "model_card": str(card)}


def train_feature_network(cfg: DictConfig) -> dict:
    """Train the digit classifier used for FD and class accuracy into `output_dir`."""
    from .featurenet import train_feature_net

    return train_feature_net(cfg.output_dir, epochs=cfg.epochs, held_out=cfg.held_out, seed=cfg.seed)


def learn_schedule(cfg: DictConfig) -> dict:
    """Learn a schedule with `ScheduleLearner` under Lightning; export it (JSON, costs, heatmap) from rank 0."""
    import resource
    import shutil
    import time

    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from .data import ConditionDataModule
    from .module import ScheduleLearner

    check_complete(cfg)
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.output_dir)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    learner = ScheduleLearner(model=model, **OmegaConf.to_container(cfg.learn, resolve=True))
    data = ConditionDataModule(num_classes=learner._ref.num_classes, **cfg.data)
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    # keep the costs with the lowest validation L2 (the hard schedule, on held-out conditions), and the last ones
    best = ModelCheckpoint(dirpath=out / "checkpoints", filename="best-{epoch}", monitor="val/l2", mode="min")
    latest = ModelCheckpoint(dirpath=out / "checkpoints", filename="latest", enable_version_counter=False)
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer = L.Trainer(**trainer_args, logger=logger, default_root_dir=out, callbacks=[best, latest])
    start = time.perf_counter()
    try:
        trainer.fit(learner, data, ckpt_path=cfg.ckpt_path)
    except SIGTERMException as e:  # Lightning's is a SystemExit(None): exit status 0, as if it had finished
        resume = out / "checkpoints" / "latest.ckpt"
        hint = f" Resume with ckpt_path={resume}." if resume.is_file() else ""
        raise SystemExit(f"Training was stopped (SIGTERM) before it finished; no schedule was exported.{hint}") from e
    if trainer.interrupted:
        raise SystemExit("Training was interrupted before it finished; no schedule was exported.")
    minutes = (time.perf_counter() - start) / 60
    if not trainer.is_global_zero:
        return {}
    best_score = best.best_model_score
    if best.best_model_path:
        checkpoint = torch.load(best.best_model_path, weights_only=False)
        learner.load_state_dict(checkpoint["state_dict"])
        shutil.copy(best.best_model_path, out / f"stage{cfg.learn.stage}.ckpt")
        if best_score is None:  # spawned processes (ddp_spawn) hand back the path only: the score is in the file
            scores = [
                v["best_model_score"] for v in checkpoint.get("callbacks", {}).values() if "best_model_score" in v
            ]
            best_score = next((s for s in scores if s is not None), None)
    metrics = learner.export(out)
    metrics["best_val_l2"] = float(best_score) if best_score is not None else None
    metrics.update(minutes=round(minutes, 2), peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    _write_json(out / "metrics.json", metrics)
    log.info("learned schedule: %s", json.dumps(metrics, default=str))
    return metrics


def search_schedule(cfg: DictConfig) -> dict:
    """Search a stage-wise schedule (`diffsparse.search`) under a level budget fitted to `search.budget` of the MACs.

    Each generation is logged, and the search state is saved to `search_state.json`; a rerun into the same
    output_dir continues from it. Stops after `search.generations`, after `search.minutes` of wall clock (at a
    generation's end), or when the search has converged (greedy). Exports the best schedule like `learn`.
    """
    from .fitness import SampleFitness
    from .search import make_search
    from .stages import StageSpace

    check_complete(cfg)
    s = cfg.search
    out = Path(cfg.output_dir)
    ref = load_configured_model(cfg)
    scheduler = ref.scheduler(s.sampler)
    scheduler.set_timesteps(s.num_steps)
    table = ref.mac_table()
    dividers = tuple(s.dividers) if s.dividers else None
    space = StageSpace(tuple(table.units), s.num_steps, s.stages, s.levels, s.grouping, dividers)
    total = space.budget_levels(table, s.budget)
    options = search_options(s)
    logger = instantiate(cfg.logger) if cfg.get("logger") else None
    with SampleFitness(ref, s.num_steps, s.fitness, s.samples, s.sampler, s.guidance, s.selector) as fitness:
        search = make_search(s.algorithm, space, total, lambda x: fitness(space.expand(x)), seed=cfg.seed, **options)
        minutes = run_search(search, s, out / "search_state.json", logger)
    levels, best = search.best
    meta = {"algorithm": s.algorithm, "fitness": s.fitness, "fitness_value": best, "budget": s.budget}
    schedule = space.expand(levels, meta)
    saved = table.saved_fraction(schedule)
    schedule = type(schedule)(schedule.grid, schedule.units, {**schedule.meta, "saved_macs": saved})
    schedule.save(out / "schedule.json")
    schedule.plot(out / "schedule.png", title=f"{s.algorithm} search ({s.fitness}): saves {saved:.1%} of MACs")
    plot_progress(search.evaluated, out / "search.png", f"{s.algorithm}: fitness ({s.fitness}) of every candidate")
    result = {
        "schedule": str(out / "schedule.json"),
        "saved_macs": saved,
        "levels": levels.tolist(),
        "level_sum": total,
        "fitness": best,
        "generations": search.generation,
        "evaluated": len(search.evaluated),
        "minutes": round(minutes, 2),
    }
    log.info("searched schedule: %s", json.dumps(result))
    return result


def search_options(s: DictConfig) -> dict:
    """The search algorithms' options from a `search:` config section."""
    keys = ("population", "survivors", "offspring", "max_mutation", "elites", "mutation_probability")
    return {k: s[k] for k in keys}


def run_search(search, s: DictConfig, state_path: Path, logger=None) -> float:
    """Advance `search` a generation at a time until `s.generations`, `s.minutes` of wall clock (checked after each
    generation) or convergence; log each generation and save the state to `state_path`, resuming from it if it
    exists. Returns the minutes spent in all runs."""
    import time

    from tqdm.auto import tqdm

    spent = 0.0
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        search.load_state_dict(state)
        spent = state.get("minutes", 0.0)
        log.info("resuming %s from generation %d (%.2f min spent)", search.name, search.generation, spent)
    start = time.perf_counter() - spent * 60
    bar = tqdm(total=s.generations, initial=search.generation, desc=f"{search.name} generations")
    while search.generation < s.generations and not search.done:
        if s.minutes is not None and time.perf_counter() - start >= s.minutes * 60:
            break
        search.step()
        minutes = (time.perf_counter() - start) / 60
        _, best = search.best
        metrics = {"search/best": best, "search/evaluated": len(search.evaluated), "search/minutes": minutes}
        if logger is not None:
            logger.log_metrics(metrics, step=search.generation)
        _write_json(state_path, {**search.state_dict(), "minutes": minutes})
        bar.update(1)
        bar.set_postfix(best=f"{best:.4g}", evaluated=len(search.evaluated))
    bar.close()
    if logger is not None:
        logger.finalize("success")
    return (time.perf_counter() - start) / 60


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, default=str))


def plot_progress(evaluated: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array([f for _, f in evaluated])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(values, ".", ms=3, alpha=0.5, label="candidate")
    ax.plot(np.maximum.accumulate(values), "-", label="best so far")
    ax.set_xlabel("candidates evaluated")
    ax.set_ylabel("fitness (higher is better)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prune_model(cfg: DictConfig) -> dict:
    from .prune.task import prune

    check_complete(cfg)
    return prune(cfg)


TRAIN_TASKS = {
    "schedule": make_schedule,
    "reference": train_reference_model,
    "feature_net": train_feature_network,
    "learn": learn_schedule,
    "search": search_schedule,
    "prune": prune_model,
}

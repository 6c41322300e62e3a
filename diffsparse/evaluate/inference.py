"""Cached inference with a schedule: images, MACs and the measured speed-up against dense, in one process."""

from __future__ import annotations

import numbers
from pathlib import Path

import torch

from diffsparse.cache import apply_token_cache, cacheable_units, remove_token_cache
from diffsparse.evaluate.metrics import psnr
from diffsparse.evaluate.timing import alternate, timed
from diffsparse.grids import labelled_grid
from diffsparse.models.generate import generate
from diffsparse.prune.calibration import stage_of_timestep
from diffsparse.prune.plan import stage_macs
from diffsparse.prune.routing import apply_pruning, remove_pruning
from diffsparse.schedule import Schedule, ScheduleError


def _capture_forward_kwargs(transformer, fn) -> dict:
    """Run `fn` and return the keyword arguments of the transformer's first forward call (for MAC counting)."""
    captured: dict = {}

    def hook(module, args, kwargs):
        if not captured:
            names = ("hidden_states",)
            captured.update({**dict(zip(names, args, strict=False)), **kwargs})

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        fn()
    finally:
        handle.remove()
    return captured


def _check_count(name: str, value, example: str) -> None:
    """Raise a `ValueError` unless `value` is a whole number >= 1 (`rounds`, `num_steps`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1 (e.g. {name}={example}), got {value!r}.")


def _device(module: torch.nn.Module) -> torch.device | None:
    return next((p.device for p in module.parameters()), None)


def run_inference(
    pipe,
    schedule: Schedule,
    conditions,
    selector: str | dict | None = None,
    seed: int = 0,
    rounds: int = 2,
    guidance_scale: float = 4.0,
    output_dir: str | Path | None = None,
) -> dict:
    """Sample with and without the token cache, alternating (`compare_with_dense`), and report MACs, speed-up and
    fidelity.

    Returns:
        dict with `mac_reduction`, `speedup` (median dense/cached time ratio over `rounds`), `speedup_min`,
        `speedup_max`, `psnr_vs_dense`, `dense_gmacs`, `cached_gmacs`, and `grid` (path of the PNG, if saved).
    """
    _check_count("rounds", rounds, "2")
    transformer = pipe.transformer
    schedule.check_units(cacheable_units(transformer))
    steps = schedule.num_steps

    def dense():
        return generate(pipe, conditions, steps, seed, guidance_scale)

    def cached():
        apply_token_cache(transformer, schedule, selector=selector)
        try:
            return generate(pipe, conditions, steps, seed, guidance_scale)
        finally:
            remove_token_cache(transformer)

    kwargs = _capture_forward_kwargs(transformer, dense)
    macs = schedule.macs(transformer, **kwargs)
    result = {"num_steps": steps, "dense_gmacs": macs["dense"] / 1e9, "cached_gmacs": macs["cached"] / 1e9,
              "mac_reduction": macs["reduction"]}  # fmt: skip
    return {**result, **compare_with_dense(dense, cached, rounds, output_dir, _device(transformer), conditions)}


def compare_with_dense(dense, method, rounds: int, output_dir: str | Path | None = None, device=None,
                       conditions=None) -> dict:  # fmt: skip
    """Time `dense()` and `method()` (each returns images in [0, 1]) alternately over `rounds` after a warm-up of
    both (`timing.alternate`, the device synchronised); the median, min and max time ratio, the PSNR of the
    method's images against dense (`metrics.psnr`: per image, averaged, in dB, 100 for identical images), and
    (with `output_dir`) a PNG of both (top row dense, bottom row the method; columns labelled by `conditions`, the
    class ids or prompts, when given). `rounds` must be >= 1."""
    _check_count("rounds", rounds, "2")
    timings = alternate({"dense": timed(dense), "method": timed(method)}, rounds, device=device)
    dense_images, method_images = timings.outputs["dense"], timings.outputs["method"]
    result = {**timings.speedup("method").as_row(), "psnr_vs_dense": float(psnr(method_images, dense_images).mean())}
    if output_dir is not None:
        path = Path(output_dir) / "samples.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        n = len(dense_images)
        columns = [str(c)[:14] for c in conditions] if conditions is not None and len(conditions) == n else None
        labelled_grid(torch.cat([dense_images, method_images]), path, columns or [str(i) for i in range(n)],
                      ["dense", "cached"])  # fmt: skip
        result["grid"] = str(path)
    return result


def run_pruned_inference(pipe, plan, conditions, seed: int = 0, rounds: int = 2, guidance_scale: float = 4.0,
                         output_dir: str | Path | None = None) -> dict:  # fmt: skip
    """Sample with and without a stage-wise pruning plan (`diffsparse.prune.PrunePlan`, weights routed into the
    pipeline's transformer by timestep), alternating. MACs are the transformer's (text encoder and VAE left out):
    one forward per stage counted with `FlopCounterMode`, times the forwards the pipeline made in each stage."""
    _check_count("rounds", rounds, "2")
    transformer, steps = pipe.transformer, int(plan.meta["num_steps"])

    def dense():
        return generate(pipe, conditions, steps, seed, guidance_scale)

    def pruned():
        apply_pruning(transformer, plan.store, plan.stage_levels)
        try:
            return generate(pipe, conditions, steps, seed, guidance_scale)
        finally:
            remove_pruning(transformer)

    timesteps, first = [], {}  # every transformer forward's timestep, and the first call's keywords

    def record(module, args, kwargs):
        call = {**dict(zip(["hidden_states", "timestep"], args, strict=False)), **kwargs}
        if not first:
            first.update(call)
        timesteps.append(float(torch.as_tensor(call["timestep"]).flatten()[0]))

    hook = transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        dense()
    finally:
        hook.remove()
    dense_macs, per_stage = stage_macs(transformer, plan, first)
    stages = stage_of_timestep(timesteps, plan.store.boundaries)
    gmacs = [dense_macs * len(timesteps) / 1e9, sum(per_stage[s] for s in stages) / 1e9]
    result = {
        "num_steps": steps,
        "dense_gmacs": gmacs[0],
        "pruned_gmacs": gmacs[1],
        "mac_reduction": gmacs[0] / gmacs[1],
    }
    return {**result, **compare_with_dense(dense, pruned, rounds, output_dir, _device(transformer), conditions)}


def resolve_schedule(path: str | None, units: list[str], num_steps: int | None, sparsity: float) -> Schedule:
    """The schedule at `path` (checked against `num_steps` if given), or a uniform one at `sparsity` over
    `num_steps` (default 20). `num_steps`, when given, must be >= 1."""
    if num_steps is not None:
        _check_count("num_steps", num_steps, "20")
    if path is None:
        return Schedule.uniform(units, num_steps or 20, sparsity)
    schedule = Schedule.load(path)
    if num_steps is not None and num_steps != schedule.num_steps:
        raise ScheduleError(
            f"Schedule {path} has {schedule.num_steps} steps but num_steps={num_steps} was asked for: drop "
            f"num_steps to use {schedule.num_steps}, or resample it with Schedule.load(...).resample({num_steps})."
        )
    return schedule

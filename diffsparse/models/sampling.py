"""Sampling loops over diffusers schedulers, with classifier-free guidance: class- or text-conditional, noise
prediction (DDIM, DPM-Solver++) or flow matching (Euler: FLUX, Wan2.1).

The stock `DiTPipeline` hard-codes ImageNet's null class (1000), guides only the first three channels and always
decodes through a VAE, so a pixel-space model with its own classes (the reference DiT) is sampled here instead.
Each transformer call is wrapped in a diffusers `CacheContext` with the step index, so diffusers' own caches
(FirstBlockCache, TaylorSeer) and ours see where the loop is.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.hooks import HookRegistry
from diffusers.models.cache_utils import CacheMixin
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from diffsparse.backbones import predict, set_steps
from diffsparse.cache.control import suspend_trajectory, trajectory_replay

SCHEDULERS = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "flow": FlowMatchEulerDiscreteScheduler}


def is_flow_matching(train_config: dict) -> bool:
    """Whether a model's noise schedule is flow matching (a `shift`), not DDPM betas."""
    return "shift" in train_config or train_config.get("_class_name") == FlowMatchEulerDiscreteScheduler.__name__


def make_scheduler(name: str, train_config: dict):
    """A sampler on the noise schedule the model was trained with: `ddim` or `dpm` (DPM-Solver++) for DDPM
    models, `flow` (flow-matching Euler) for flow-matching ones (FLUX, Wan2.1)."""
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown sampler {name!r}; choose one of {sorted(SCHEDULERS)}.")
    if (name == "flow") != is_flow_matching(train_config):
        kind = "flow-matching" if is_flow_matching(train_config) else "DDPM"
        raise ValueError(
            f"Sampler {name!r} does not fit a {kind} model: use {'flow' if kind[0] == 'f' else 'ddim or dpm'}."
        )
    return SCHEDULERS[name].from_config(train_config)


def cache_context(model: torch.nn.Module, **fields):
    """`transformer.cache_context(...)` for any model, also those whose class lacks diffusers' `CacheMixin`."""
    return CacheMixin.cache_context(model, "cfg", **fields)


def initial_noise(num: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """`num` standard-normal samples of `shape`, sample i drawn from its own seed `seed + i`.

    Per-sample seeds make a sample's noise independent of how many samples are drawn with it.
    """
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(num)])


@dataclass
class Paused:
    """A sampling loop stopped before step `step` (`sample(..., pause_at=step)`); `sample(..., resume=paused)` runs
    it on from there, as often as needed, also under another schedule that acts the same before `step`."""

    step: int
    x: torch.Tensor
    scheduler: object  # the sampler as it was then (a copy; each resume works on its own copy)
    restore_cache: Callable[[], None] | None  # puts the token cache's trajectory back as it was (no cache: None)


def sample(
    transformer: torch.nn.Module,
    scheduler,
    conditions: torch.Tensor | dict,
    noise: torch.Tensor,
    num_steps: int,
    guidance_scale: float = 1.5,
    null_class: int | None = None,
    null_conditions: dict | None = None,
    checkpoint_steps: bool = False,
    progress: bool = False,
    pause_at: int | None = None,
    resume: Paused | None = None,
) -> torch.Tensor | Paused:
    """Denoise `noise` (B, C, H, W) in `num_steps` steps; returns x0 in model space (latents for latent models).

    Args:
        conditions: class ids (B,) for class-conditional models (DiT), or the transformer's conditioning keyword
            arguments as a dict of batch-first tensors (PixArt: `encoder_hidden_states`, `encoder_attention_mask`;
            FLUX: `encoder_hidden_states`, `pooled_projections`; Wan: `encoder_hidden_states`). `noise` is
            (B, C, F, H, W) for video models.
        guidance_scale: with `!= 1` each call runs a batch of 2B: the conditional half, then the unconditional half.
        null_class: the unconditional class (default: the model's `num_embeds_ada_norm`).
        null_conditions: the unconditional half for a dict of conditions (PixArt: the empty prompt's embedding),
            batch 1 or B.
        checkpoint_steps: recompute each step's activations in the backward pass instead of keeping them
            (gradient checkpointing per step; memory then grows with the steps only by the latents and the token
            cache). Only matters when autograd is on.
        pause_at: stop before this step and return a `Paused` instead of x0.
        resume: run on from where an earlier call paused (`noise` and `conditions` as given to it).
    """
    guided = guidance_scale != 1.0
    kwargs = _guided_conditions(transformer, conditions, null_class, null_conditions, guided, len(noise))
    if resume is None:
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        registry.invalidate_child_registries_cache()  # hooks may have been added or removed since the last call
        registry.reset_stateful_hooks(recurse=True)
        set_steps(transformer, scheduler, num_steps, noise)
        x, first = noise * getattr(scheduler, "init_noise_sigma", 1.0), 0
    else:
        scheduler, x, first = copy.deepcopy(resume.scheduler), resume.x, resume.step
        if resume.restore_cache is not None:
            resume.restore_cache()
    last = num_steps if pause_at is None else pause_at
    if not first <= last <= num_steps:
        raise ValueError(f"Cannot run steps {first} to {last} of a {num_steps}-step trajectory.")
    checkpointed = checkpoint_steps and torch.is_grad_enabled()
    indices = range(first, last)
    for i in tqdm(indices, desc="sampling", leave=False) if progress else indices:
        t = scheduler.timesteps[i]
        x_in = torch.cat([x, x]) if guided else x
        if hasattr(scheduler, "scale_model_input"):
            x_in = scheduler.scale_model_input(x_in, t)

        def denoise(x_in, i=i, t=t):
            with cache_context(transformer, step_index=i, num_inference_steps=num_steps, timestep=t):
                return predict(transformer, x_in, t, kwargs)

        out = _checkpointed(denoise, x_in, transformer) if checkpointed else denoise(x_in)
        if guided:
            cond, uncond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        x = scheduler.step(out, t, x).prev_sample
    if pause_at is None:
        return x
    return Paused(pause_at, x, copy.deepcopy(scheduler), suspend_trajectory(transformer))


def _checkpointed(denoise, x_in: torch.Tensor, transformer) -> torch.Tensor:
    """`denoise(x_in)` whose activations are recomputed in the backward pass instead of kept. The token cache is
    state carried from step to step, so the recomputation replays it as it was at this step."""
    replay = trajectory_replay(transformer)
    first = [True]

    def run(x):
        if first[0] or replay is None:
            first[0] = False
            return denoise(x)
        with replay():
            return denoise(x)

    return checkpoint(run, x_in, use_reentrant=False)


def _guided_conditions(transformer, conditions, null_class, null_conditions, guided: bool, batch: int) -> dict:
    """The transformer's conditioning keywords for a batch (doubled with the unconditional half when guided)."""
    if isinstance(conditions, dict) and set(conditions) == {"class_labels"}:
        conditions = conditions["class_labels"]
    if isinstance(conditions, torch.Tensor):
        if not guided:
            return {"class_labels": conditions}
        if null_class is None:
            null_class = transformer.config.num_embeds_ada_norm
        return {"class_labels": torch.cat([conditions, torch.full_like(conditions, null_class)])}
    kwargs = dict(conditions)
    if not guided:
        return kwargs
    tensors = {k for k, v in conditions.items() if isinstance(v, torch.Tensor)}
    if null_conditions is None or set(null_conditions) != tensors:
        raise ValueError(
            f"Guidance with conditioning keywords needs null_conditions with the keys {sorted(tensors)} "
            f"(the unconditional half), got {None if null_conditions is None else sorted(null_conditions)}."
        )
    for key in tensors:
        value, null = conditions[key], null_conditions[key].to(conditions[key].device, conditions[key].dtype)
        kwargs[key] = torch.cat([value, null.expand(batch, *null.shape[1:])])
    return kwargs


@torch.no_grad()
def sample_batched(transformer, scheduler, conditions, noise, num_steps, batch_size: int = 256, **kwargs):
    """`sample` without gradients, `batch_size` samples at a time, with a progress bar. `conditions`: class ids
    (B,) or a dict of the transformer's conditioning keywords, batch-first tensors (split with the noise)."""
    chunks = list(zip(split_conditions(conditions, batch_size), noise.split(batch_size), strict=True))
    bar = tqdm(chunks, desc="batches", leave=False) if len(chunks) > 1 else chunks
    return torch.cat([sample(transformer, scheduler, y, z, num_steps, **kwargs) for y, z in bar])


def split_conditions(conditions: torch.Tensor | dict, batch_size: int) -> list:
    """Class ids, or a dict of batch-first tensors, in chunks of `batch_size` (a dict's other values go to every
    chunk as they are)."""
    if isinstance(conditions, torch.Tensor):
        return list(conditions.split(batch_size))
    sizes = {k: len(v) for k, v in conditions.items() if isinstance(v, torch.Tensor)}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"Conditions need batch-first tensors of one batch size, got {sizes}.")
    tensors = {k: conditions[k].split(batch_size) for k in sizes}
    chunks = len(next(iter(tensors.values())))
    return [{k: tensors[k][i] if k in tensors else v for k, v in conditions.items()} for i in range(chunks)]

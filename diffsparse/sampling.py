"""Class-conditional sampling loops over diffusers schedulers, with classifier-free guidance.

The stock `DiTPipeline` hard-codes ImageNet's null class (1000), guides only the first three channels and always
decodes through a VAE, so a pixel-space model with its own classes (the reference DiT) is sampled here instead.
Each transformer call is wrapped in a diffusers `CacheContext` with the step index, so diffusers' own caches
(FirstBlockCache, TaylorSeer) and ours see where the loop is.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.hooks import HookRegistry
from diffusers.models.cache_utils import CacheMixin
from tqdm.auto import tqdm

SCHEDULERS = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}


def make_scheduler(name: str, train_config: dict):
    """A sampler (`ddim` or `dpm` = DPM-Solver++) on the noise schedule the model was trained with."""
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown sampler {name!r}; choose one of {sorted(SCHEDULERS)}.")
    return SCHEDULERS[name].from_config(train_config)


def cache_context(model: torch.nn.Module, **fields):
    """`transformer.cache_context(...)` for any model, also those whose class lacks diffusers' `CacheMixin`."""
    return CacheMixin.cache_context(model, "cfg", **fields)


def initial_noise(num: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """`num` standard-normal samples of `shape`, sample i drawn from its own seed `seed + i`.

    Per-sample seeds make a sample's noise independent of how many samples are drawn with it.
    """
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(num)])


def sample(
    transformer: torch.nn.Module,
    scheduler,
    class_labels: torch.Tensor,
    noise: torch.Tensor,
    num_steps: int,
    guidance_scale: float = 1.5,
    null_class: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Denoise `noise` (B, C, H, W) for `class_labels` (B,) in `num_steps` steps; returns x0 in model space.

    With `guidance_scale != 1` each call runs a batch of 2B: the conditional half, then the unconditional half
    (label `null_class`, by default the model's `num_embeds_ada_norm`). Gradients flow when autograd is on.
    """
    guided = guidance_scale != 1.0
    if guided and null_class is None:
        null_class = transformer.config.num_embeds_ada_norm
    labels = torch.cat([class_labels, torch.full_like(class_labels, null_class)]) if guided else class_labels
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.invalidate_child_registries_cache()  # hooks may have been added or removed since the last call
    registry.reset_stateful_hooks(recurse=True)
    scheduler.set_timesteps(num_steps)
    x = noise * scheduler.init_noise_sigma
    steps = scheduler.timesteps
    for i, t in enumerate(tqdm(steps, desc="sampling", leave=False) if progress else steps):
        x_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
        with cache_context(transformer, step_index=i, num_inference_steps=num_steps, timestep=t):
            out = transformer(x_in, timestep=t.expand(x_in.shape[0]), class_labels=labels).sample
        out = out[:, : x.shape[1]]  # drop a learned-variance half, if the model has one
        if guided:
            cond, uncond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        x = scheduler.step(out, t, x).prev_sample
    return x


@torch.no_grad()
def sample_batched(transformer, scheduler, class_labels, noise, num_steps, batch_size: int = 256, **kwargs):
    """`sample` without gradients, `batch_size` samples at a time, with a progress bar over the batches."""
    chunks = list(zip(class_labels.split(batch_size), noise.split(batch_size), strict=True))
    bar = tqdm(chunks, desc="batches", leave=False) if len(chunks) > 1 else chunks
    return torch.cat([sample(transformer, scheduler, y, z, num_steps, **kwargs) for y, z in bar])

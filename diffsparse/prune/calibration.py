"""SNR-aware calibration (MosaicDiff section 3.2, Diff-ES section 3.3): per stage, the statistics pruning needs.

A stage is a range of train timesteps. Its calibration inputs are real samples (the digits, for the reference
model) noised with the model's own noise schedule to timesteps drawn uniformly from the stage, with their
classes, each run as a classifier-free-guidance pair (its class and the null class) as sampling does. Latent
models would be calibrated on their own images through their VAE; only the digits are at hand here, so
`calibration_batches` refuses them, and `store.store_from_batches` takes batches made any other way. One pass
accumulates what the pruning method needs: per prunable layer, the consumer's input Hessian `X^T X` (OBS) or each
producer's per-feature mean squared input (Wanda), in float64; per block, the mean cosine similarity between its
input and output tokens (LayerDrop).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import DDPMScheduler

from diffsparse.backbones.registry import backbone_for
from diffsparse.prune.structures import prunable_layers
from diffsparse.reference.digits import load_digits


def stage_of_timestep(timesteps, boundaries) -> np.ndarray:
    """Stage of each train timestep: stage 0 holds t >= boundaries[0] (the noisiest), stage k holds
    boundaries[k-1] > t >= boundaries[k]; `boundaries` are decreasing."""
    t = np.asarray([float(x) for x in np.atleast_1d(timesteps)])
    b = np.asarray(boundaries, dtype=float)
    return (b[None, :] > t[:, None]).sum(axis=1) if len(b) else np.zeros(len(t), dtype=np.int64)


def stage_range(stage: int, boundaries, num_train_timesteps: int) -> tuple[int, int]:
    """Inclusive `(low, high)` train timesteps of a stage."""
    edges = [num_train_timesteps, *boundaries, 0]
    return int(edges[stage + 1]), int(edges[stage]) - 1


def step_boundaries(timesteps, stage_of_step) -> list[int]:
    """Boundaries (train timesteps) that cut a sampler's steps where `stage_of_step` changes: the boundary before
    a stage's first step is that step's timestep + 1."""
    t, s = np.asarray([int(x) for x in timesteps]), np.asarray(stage_of_step)
    return [int(t[i]) + 1 for i in range(1, len(t)) if s[i] != s[i - 1]]


def check_boundaries(boundaries, num_train_timesteps: int) -> list[int]:
    b = [int(x) for x in boundaries]
    if any(x <= y for x, y in zip(b, b[1:], strict=False)) or (b and not num_train_timesteps > b[0] > b[-1] > 0):
        raise ValueError(
            f"stage boundaries must be decreasing train timesteps in 1..{num_train_timesteps - 1}, got {b}"
        )
    return b


def calibration_batches(
    ref, boundaries, stage: int, samples: int, seed: int = 0, batch_size: int = 64
) -> Iterator[dict]:
    """Forward keyword batches for one stage: real digits noised to timesteps drawn from the stage, as CFG pairs."""
    if ref.text_conditioned or ref.vae is not None:
        raise NotImplementedError(
            "SNR-aware calibration noises the digits (pixel space, 10 classes): it covers the reference model and "
            "pixel-space class-conditional models of its shape only, for now. For another model, build the "
            "store with prune.store.store_from_batches on batches of your own noised data."
        )
    images, labels = load_digits(ref.sample_shape[-1])
    g = torch.Generator().manual_seed(seed * 1000 + stage)
    pick = torch.randint(len(images), (samples,), generator=g)
    noise_schedule = DDPMScheduler(**ref.noise_schedule)
    low, high = stage_range(stage, boundaries, noise_schedule.config.num_train_timesteps)
    t = torch.randint(low, high + 1, (samples,), generator=g)
    dtype = next(ref.transformer.parameters()).dtype
    for i in range(0, samples, batch_size):
        idx, ti = pick[i : i + batch_size], t[i : i + batch_size]
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=g)
        xt = noise_schedule.add_noise(x0, noise, ti).to(dtype)
        null = torch.full_like(labels[idx], ref.transformer.config.num_embeds_ada_norm)
        yield dict(hidden_states=torch.cat([xt, xt]), timestep=torch.cat([ti, ti]),
                   class_labels=torch.cat([labels[idx], null]))  # fmt: skip


def _accumulate(store: dict, key, value: torch.Tensor) -> None:
    store[key] = value if key not in store else store[key] + value


@dataclass
class Statistics:
    """What one stage's calibration pass measured (only what was asked for)."""

    hessians: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> consumer X^T X (float64)
    producer_sq: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # layer -> per producer, mean x_j^2
    block_cosine: torch.Tensor | None = None  # (blocks,) mean input/output cosine similarity
    samples: int = 0  # calibration samples (each run as a CFG pair)


NEEDS = {"obs": ("hessians",), "wanda": ("producer_sq",), "layerdrop": ("block_cosine",)}


@torch.no_grad()
def collect_statistics(
    model: torch.nn.Module, batches: Iterable[dict], needs=("hessians", "producer_sq", "block_cosine")
) -> Statistics:
    """Run `model` on every batch of forward keywords and accumulate the statistics named in `needs` (an OBS
    Hessian is `in x in` float64 per layer: only ask for it when pruning with OBS)."""
    layers = prunable_layers(model)
    blocks = getattr(model, backbone_for(model).blocks)
    device = next(model.parameters()).device
    stats = Statistics()
    hessians, sq, counts = {}, {}, {}
    cos_sum, cos_count = torch.zeros(len(blocks), dtype=torch.float64, device=device), [0] * len(blocks)
    handles = []

    def consumer_hook(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            _accumulate(hessians, name, x.T @ x)

        return hook

    def producer_hook(name, i):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            _accumulate(sq, (name, i), (x * x).sum(0))
            counts[(name, i)] = counts.get((name, i), 0) + len(x)

        return hook

    def block_hook(b):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
            cos_sum[b] += cos.sum()
            cos_count[b] += cos.numel()

        return hook

    for layer in layers:
        if "hessians" in needs:
            handles.append(layer.consumer.register_forward_pre_hook(consumer_hook(layer.name)))
        for i, p in enumerate(layer.producers if "producer_sq" in needs else ()):
            handles.append(p.register_forward_pre_hook(producer_hook(layer.name, i)))
    for b, block in enumerate(blocks if "block_cosine" in needs else ()):
        handles.append(block.register_forward_hook(block_hook(b), with_kwargs=True))
    try:
        for kwargs in batches:
            model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
            stats.samples += kwargs["hidden_states"].shape[0] // 2
    finally:
        for h in handles:
            h.remove()
    stats.hessians = hessians
    if "producer_sq" in needs:
        stats.producer_sq = {
            layer.name: [sq[(layer.name, i)] / counts[(layer.name, i)] for i in range(len(layer.producers))]
            for layer in layers
        }
    if "block_cosine" in needs:
        stats.block_cosine = (cos_sum / torch.tensor([max(c, 1) for c in cos_count], device=device)).cpu()
    return stats

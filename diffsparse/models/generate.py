"""Sampling a model the same way for every backbone: a stock pipeline, or our own loop for the model handles that
have none (the shipped digits DiT, a transformer folder)."""

from __future__ import annotations

import torch

from diffsparse.backbones import backbone_for
from diffsparse.models.handle import ModelHandle
from diffsparse.models.sampling import initial_noise, is_flow_matching, sample
from diffsparse.reference.digits import to_unit_range


def generate(pipe, conditions, num_steps: int, seed: int = 0, guidance_scale: float = 4.0) -> torch.Tensor:
    """Sample images `(B, 3, H, W)` in [0, 1] with `pipe` from fixed noise.

    Args:
        pipe: a stock pipeline, or the reference model (`diffsparse.models.handle.ModelHandle`, sampled with DDIM).
        conditions: class ids for class-conditional pipelines (DiT); prompts, or a dict of prompt-embedding
            keyword arguments (`prompt_embeds`, ...), for text-conditional ones (PixArt).
    """
    options = {}
    if isinstance(pipe, ModelHandle) and pipe.pipeline is not None:
        pipe, options = pipe.pipeline, pipe.pipeline_options
    if isinstance(pipe, ModelHandle):  # no stock pipeline (the shipped digits DiT): our own sampling loop
        if pipe.text_conditioned:
            raise ValueError("A text-conditional model without its pipeline: load the saved pipeline folder instead.")
        labels = torch.as_tensor(list(conditions))
        check_classes(labels, pipe.num_classes)
        noise = initial_noise(len(labels), pipe.sample_shape, seed)
        sampler = "flow" if is_flow_matching(pipe.noise_schedule) else "ddim"
        with torch.no_grad():
            x = sample(pipe.transformer, pipe.scheduler(sampler), labels, noise, num_steps, guidance_scale)
            return to_unit_range(pipe.decode(x))
    generator = torch.Generator().manual_seed(seed)
    common = dict(num_inference_steps=num_steps, generator=generator, output_type="pt", guidance_scale=guidance_scale)
    common.update(options)
    name = type(pipe).__name__
    if not backbone_for(pipe.transformer).text_conditioned:  # class-conditional (DiT)
        check_classes(torch.as_tensor(list(conditions)), pipe.transformer.config.num_embeds_ada_norm)
        return pipe(class_labels=list(conditions), **common).images
    if isinstance(conditions, dict):
        return pipe(prompt=None, negative_prompt=None, use_resolution_binning=False, **conditions, **common).images
    if getattr(pipe, "text_encoder", None) is None:
        raise ValueError(f"{name} has no text encoder: pass prompt embeddings (a dict) instead of prompts.")
    if not conditions or not all(isinstance(c, str) for c in conditions):
        raise ValueError(f"{name} is text-conditional: pass conditions as a list of prompts, got {conditions!r}.")
    out = pipe(prompt=list(conditions), **common)
    return out.images if hasattr(out, "images") else out.frames[:, 0]  # video: its first frame


def check_classes(labels: torch.Tensor, num_classes: int) -> None:
    """Refuse class ids the model does not have (they would index past its class embedding)."""
    if labels.dtype.is_floating_point or labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"conditions must be a non-empty list of class ids, got {labels.tolist()}.")
    bad = [int(c) for c in labels if not 0 <= int(c) < num_classes]
    if bad:
        raise ValueError(
            f"Class ids {bad} are out of range: this model has {num_classes} classes (0..{num_classes - 1}). "
            f"Pass conditions=[...] with ids below {num_classes}."
        )

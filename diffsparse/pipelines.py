"""Loading stock diffusers pipelines, and calling them the same way for every backbone."""

from __future__ import annotations

import os
from pathlib import Path

import torch

PIPELINE_CLASSES = {
    "dit": "DiTPipeline",
    "pixart": "PixArtAlphaPipeline",
    "flux": "FluxPipeline",
    "wan": "WanPipeline",
}


def pipeline_backbone(path: Path) -> str:
    """The backbone of a saved pipeline folder, from the class named in its `model_index.json`."""
    import json

    name = json.loads((Path(path) / "model_index.json").read_text())["_class_name"]
    for backbone, cls in PIPELINE_CLASSES.items():
        if name == cls or name.startswith(cls.removesuffix("Pipeline").removesuffix("Alpha")):
            return backbone
    raise ValueError(f"{path} holds a {name}; supported pipelines: {sorted(PIPELINE_CLASSES.values())}.")


def load_pipeline(pretrained: str, backbone: str = "dit", dtype: str = "float32", device: str = "cpu"):
    """`from_pretrained` of the stock pipeline for `backbone`, from a local folder or a hub id.

    A hub id needs network access (or the hub cache); where it is missing the error says what to do.
    """
    import diffusers

    if backbone not in PIPELINE_CLASSES:
        raise ValueError(f"Unknown backbone {backbone!r}; choose one of {sorted(PIPELINE_CLASSES)}.")
    cls = getattr(diffusers, PIPELINE_CLASSES[backbone])
    local = Path(os.path.expanduser(pretrained))
    if (pretrained.startswith((".", "/", "~")) or local.exists()) and not (local / "model_index.json").is_file():
        raise FileNotFoundError(
            f"No diffusers pipeline at {local} (no model_index.json). Save one with `pipe.save_pretrained(path)` "
            "or download it with `huggingface-cli download <id> --local-dir <path>` on a machine with network."
        )
    try:
        pipe = cls.from_pretrained(pretrained, dtype=getattr(torch, dtype))
    except OSError as e:
        raise OSError(
            f"Could not load {pretrained!r} with {cls.__name__}.from_pretrained: {e}\n"
            "Without network access, download the weights elsewhere (`huggingface-cli download "
            f"{pretrained} --local-dir DIR`), copy DIR here and pass model.pretrained=DIR."
        ) from e
    return pipe.to(device)


def generate(pipe, conditions, num_steps: int, seed: int = 0, guidance_scale: float = 4.0) -> torch.Tensor:
    """Sample images `(B, 3, H, W)` in [0, 1] with `pipe` from fixed noise.

    Args:
        pipe: a stock pipeline, or the reference model (`diffsparse.reference.Reference`, sampled with DDIM).
        conditions: class ids for class-conditional pipelines (DiT); prompts, or a dict of prompt-embedding
            keyword arguments (`prompt_embeds`, ...), for text-conditional ones (PixArt).
    """
    from .reference import Reference

    if isinstance(pipe, Reference):  # the shipped pixel-space digits model: our own sampling loop
        from .digits import to_unit_range
        from .sampling import initial_noise, sample

        labels = torch.as_tensor(list(conditions))
        noise = initial_noise(len(labels), pipe.sample_shape, seed)
        with torch.no_grad():
            x = sample(pipe.transformer, pipe.scheduler("ddim"), labels, noise, num_steps, guidance_scale)
        return to_unit_range(x)
    generator = torch.Generator().manual_seed(seed)
    common = dict(num_inference_steps=num_steps, generator=generator, output_type="pt", guidance_scale=guidance_scale)
    name = type(pipe).__name__
    if name == "DiTPipeline":
        return pipe(class_labels=list(conditions), **common).images
    if isinstance(conditions, dict):
        return pipe(prompt=None, negative_prompt=None, use_resolution_binning=False, **conditions, **common).images
    if getattr(pipe, "text_encoder", None) is None:
        raise ValueError(f"{name} has no text encoder: pass prompt embeddings (a dict) instead of prompts.")
    return pipe(prompt=list(conditions), **common).images

"""Loading a model saved as a folder of parts: `transformer/` with its training noise schedule beside it
(`noise_schedule.json` or `scheduler/`) and, for a latent model, `vae/` (the shipped reference is laid out so)."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch

from diffsparse.backbones import BACKBONES
from diffsparse.models.handle import ModelHandle

# An example for the error message: DiT's own training noise schedule.
EXAMPLE_NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


def check_transformer_class(class_name: str, where: str) -> None:
    """Refuse a transformer class no registry row names."""
    if any(class_name in spec.model_classes for spec in BACKBONES.values()):
        return
    supported = sorted(c for s in BACKBONES.values() for c in s.model_classes)
    raise ValueError(f"{where} holds a {class_name}; supported: {supported}.")


def dtype_of(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use float32, bfloat16 or float16.")
    return getattr(torch, dtype)


def load_transformer_folder(path: Path, dtype=None, height=None, width=None, frames=None) -> ModelHandle:
    """A `transformer/` folder with `noise_schedule.json` (or `scheduler/`) and, for latent models, `vae/`."""
    config_file = path / "transformer" / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{path} is neither a saved pipeline (model_index.json) nor a transformer folder "
            f"(no {config_file}). Save a model with `transformer.save_pretrained(DIR / 'transformer')` and its "
            "noise schedule as DIR/noise_schedule.json, or a whole pipeline with `pipe.save_pretrained(DIR)`."
        )
    class_name = json.loads(config_file.read_text()).get("_class_name", "")
    check_transformer_class(class_name, str(config_file))
    transformer = getattr(diffusers, class_name).from_pretrained(path / "transformer", dtype=dtype_of(dtype))
    schedule_file, scheduler_dir = path / "noise_schedule.json", path / "scheduler" / "scheduler_config.json"
    if schedule_file.is_file():
        noise_schedule = json.loads(schedule_file.read_text())
    elif scheduler_dir.is_file():
        noise_schedule = json.loads(scheduler_dir.read_text())
        if "shift" not in noise_schedule:  # DDPM: keep the training betas only, as for a pipeline
            noise_schedule = {k: v for k, v in noise_schedule.items() if not k.startswith("_")}
    else:
        raise FileNotFoundError(
            f"{path} has a transformer but no noise schedule: expected {schedule_file} (the training noise "
            f"schedule, e.g. {json.dumps(EXAMPLE_NOISE_SCHEDULE)}) or {scheduler_dir} (a diffusers scheduler's "
            "save_pretrained)."
        )
    vae = None
    if (path / "vae" / "config.json").is_file():
        vae_class = json.loads((path / "vae" / "config.json").read_text()).get("_class_name", "AutoencoderKL")
        vae = getattr(diffusers, vae_class).from_pretrained(path / "vae", dtype=dtype_of(dtype))
        vae = vae.eval().requires_grad_(False)
    shape = None
    if frames is not None:
        raise ValueError(f"{path} holds an image transformer: `frames` is for video pipelines (Wan).")
    for name, side in (("height", height), ("width", width)):
        if side is not None and (not isinstance(side, int) or side < 1):
            raise ValueError(f"{name}={side!r}: give a positive number of pixels.")
    if height or width:
        scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        c = transformer.config
        shape = (c.in_channels, (height or width) // scale, (width or height) // scale)
    return ModelHandle(transformer.eval().requires_grad_(False), noise_schedule, vae=vae, shape=shape)

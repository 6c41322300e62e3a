"""One way to name a model, for every task: `load_model(name_or_path, **options)` -> a `ModelHandle` handle.

A name is a key of `MODELS` (the same names as the Hydra `model` config group: `python train.py model=NAME`,
`python infer.py model=NAME`, `python -m diffsparse.evaluate --model NAME`). A path is a folder holding either a
saved stock pipeline (`model_index.json`: DiT, PixArt-alpha, FLUX, Wan2.1), or a transformer folder
(`transformer/`) with its training noise schedule beside it (`noise_schedule.json`, or a `scheduler/` folder), and
for latent models a `vae/` folder. Class counts come from the model's config; latent shapes from the pipeline's
own defaults or from the `height` / `width` / `frames` options, never from constants.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import diffusers
import torch
from hydra.utils import instantiate

from diffsparse.backbones.flow_tiny import tiny_flux_pipeline, tiny_wan_pipeline
from diffsparse.backbones.tiny import build_transformer, tiny_pipeline, tiny_vae
from diffsparse.models.handle import ModelHandle
from diffsparse.models.sampling import is_flow_matching
from diffsparse.reference.digits import IMAGE_SIZE, NUM_CLASSES
from diffsparse.reference.model import NOISE_SCHEDULE, load_reference

# The stock pipeline class of each backbone, and the transformer class a bare transformer folder names.
PIPELINE_CLASSES = {
    "dit": "DiTPipeline",
    "pixart": "PixArtAlphaPipeline",
    "flux": "FluxPipeline",
    "wan": "WanPipeline",
}
TRANSFORMER_CLASSES = {
    "DiTTransformer2DModel": "dit",
    "PixArtTransformer2DModel": "pixart",
    "FluxTransformer2DModel": "flux",
    "WanTransformer3DModel": "wan",
}


def pipeline_backbone(path: Path) -> str:
    """The backbone of a saved pipeline folder, from the class named in its `model_index.json`."""
    name = json.loads((Path(path) / "model_index.json").read_text())["_class_name"]
    for backbone, cls in PIPELINE_CLASSES.items():
        if name == cls or name.startswith(cls.removesuffix("Pipeline").removesuffix("Alpha")):
            return backbone
    raise ValueError(f"{path} holds a {name}; supported pipelines: {sorted(PIPELINE_CLASSES.values())}.")


def _pipeline_default(pipe, name: str):
    """A keyword's default in the pipeline's `__call__` (e.g. Wan's `height=480`), or None."""
    parameter = inspect.signature(type(pipe).__call__).parameters.get(name)
    return None if parameter is None else parameter.default


def _flux_latents(pipe, height, width, frames):
    """FLUX packs 2 x 2 latent patches into tokens: sides are multiples of 2 x the VAE's factor (1024 by default)."""
    scale = pipe.vae_scale_factor
    height = height or pipe.default_sample_size * scale
    width = width or pipe.default_sample_size * scale
    for side in (height, width):
        if side % (2 * scale):
            raise ValueError(f"FLUX height and width must be multiples of {2 * scale} (VAE x 2), got {side}.")
    return (pipe.transformer.config.in_channels // 4, 2 * (height // (2 * scale)), 2 * (width // (2 * scale)))


def _wan_latents(pipe, height, width, frames):
    """Wan compresses time and space: its call's defaults are 81 frames of 480 x 832."""
    spatial, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
    height = height or _pipeline_default(pipe, "height")
    width = width or _pipeline_default(pipe, "width")
    frames = frames or _pipeline_default(pipe, "num_frames")
    if (frames - 1) % temporal:
        raise ValueError(f"Wan frames - 1 must be a multiple of {temporal}, got frames={frames}.")
    return (pipe.transformer.config.in_channels, (frames - 1) // temporal + 1, height // spatial, width // spatial)


def _image_latents(pipe, height, width, frames):
    """DiT, PixArt: the transformer's `sample_size` unless a size is asked for."""
    if height is None and width is None:
        return None
    scale = getattr(pipe, "vae_scale_factor", None) or 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return (pipe.transformer.config.in_channels, (height or width) // scale, (width or height) // scale)


# backbone -> latents of one sample as its stock pipeline makes them (None: the transformer's config says)
LATENT_SHAPES = {"flux": _flux_latents, "wan": _wan_latents, "dit": _image_latents, "pixart": _image_latents}


def latent_shape(pipe, backbone: str, height=None, width=None, frames=None) -> tuple[int, ...] | None:
    """Latents of one sample as the stock pipeline makes them at `height` x `width` (x `frames`), or at the
    pipeline's defaults; None where the transformer's config says it (DiT, PixArt without options)."""
    return LATENT_SHAPES[backbone](pipe, height, width, frames)


def handle_of(pipe, backbone: str | None = None, height=None, width=None, frames=None) -> ModelHandle:
    """The model handle of a stock pipeline: its transformer (frozen), VAE, training noise schedule and latent
    shape; the pipeline itself is kept for `infer.py`'s stock-pipeline sampling."""
    backbone = backbone or _backbone_of_transformer(pipe.transformer)
    shape_options = dict(height=height, width=width, frames=frames)
    transformer = pipe.transformer.eval().requires_grad_(False)
    if is_flow_matching(pipe.scheduler.config):  # the scheduler's whole config (FLUX, Wan)
        noise_schedule = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
        noise_schedule["_class_name"] = type(pipe.scheduler).__name__
    else:
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "trained_betas")
        noise_schedule = {k: pipe.scheduler.config[k] for k in keys if k in pipe.scheduler.config}
    shape = latent_shape(pipe, backbone, **shape_options)
    vae = pipe.vae.eval().requires_grad_(False)
    names = {"height": "height", "width": "width", "frames": "num_frames"}
    options = {names[k]: v for k, v in shape_options.items() if v is not None}
    return ModelHandle(transformer, noise_schedule, vae=vae, shape=shape, pipeline=pipe, pipeline_options=options)


def _backbone_of_transformer(transformer) -> str:
    name = type(transformer).__name__
    if name not in TRANSFORMER_CLASSES:
        raise ValueError(f"A {name} is not a supported transformer; supported: {sorted(TRANSFORMER_CLASSES)}.")
    return TRANSFORMER_CLASSES[name]


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use float32, bfloat16 or float16.")
    return getattr(torch, dtype)


def load_pipeline(pretrained: str, backbone: str = "dit", dtype: str = "float32", device: str = "cpu"):
    """`from_pretrained` of the stock pipeline for `backbone`, from a local folder or a hub id.

    A hub id needs network access (or the hub cache); where it is missing the error says what to do.
    """
    if backbone not in PIPELINE_CLASSES:
        raise ValueError(f"Unknown backbone {backbone!r}; choose one of {sorted(PIPELINE_CLASSES)}.")
    cls = getattr(diffusers, PIPELINE_CLASSES[backbone])
    local = Path(pretrained).expanduser()
    if (str(pretrained).startswith((".", "/", "~")) or local.exists()) and not (local / "model_index.json").is_file():
        raise FileNotFoundError(
            f"No diffusers pipeline at {local} (no model_index.json). Save one with `pipe.save_pretrained(path)` "
            "or download it with `huggingface-cli download <id> --local-dir <path>` on a machine with network."
        )
    try:
        pipe = cls.from_pretrained(str(local) if local.exists() else pretrained, dtype=_dtype(dtype))
    except OSError as e:
        raise OSError(
            f"Could not load {pretrained!r} with {cls.__name__}.from_pretrained: {e}\n"
            "Without network access, download the weights elsewhere (`huggingface-cli download "
            f"{pretrained} --local-dir DIR`), copy DIR here and pass model.path=DIR (or model.pretrained=DIR)."
        ) from e
    return pipe.to(device)


def _from_transformer_folder(path: Path, dtype=None, height=None, width=None) -> ModelHandle:
    """A `transformer/` folder with `noise_schedule.json` (or `scheduler/`) and, for latent models, `vae/`."""
    config_file = path / "transformer" / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{path} is neither a saved pipeline (model_index.json) nor a transformer folder "
            f"(no {config_file}). Save a model with `transformer.save_pretrained(DIR / 'transformer')` and its "
            "noise schedule as DIR/noise_schedule.json, or a whole pipeline with `pipe.save_pretrained(DIR)`."
        )
    class_name = json.loads(config_file.read_text()).get("_class_name", "")
    if class_name not in TRANSFORMER_CLASSES:
        raise ValueError(f"{config_file} holds a {class_name}; supported: {sorted(TRANSFORMER_CLASSES)}.")
    transformer = getattr(diffusers, class_name).from_pretrained(path / "transformer", dtype=_dtype(dtype))
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
            f"schedule, e.g. {json.dumps(NOISE_SCHEDULE)}) or {scheduler_dir} (a diffusers scheduler's "
            "save_pretrained)."
        )
    vae = None
    if (path / "vae" / "config.json").is_file():
        vae_class = json.loads((path / "vae" / "config.json").read_text()).get("_class_name", "AutoencoderKL")
        vae = getattr(diffusers, vae_class).from_pretrained(path / "vae", dtype=_dtype(dtype))
        vae = vae.eval().requires_grad_(False)
    shape = None
    if height or width:
        scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        c = transformer.config
        shape = (c.in_channels, (height or width) // scale, (width or height) // scale)
    return ModelHandle(transformer.eval().requires_grad_(False), noise_schedule, vae=vae, shape=shape)


def _tiny_dit(**_) -> ModelHandle:
    transformer = build_transformer("dit", "tiny", sample_size=IMAGE_SIZE, in_channels=1, num_classes=NUM_CLASSES)
    return ModelHandle(transformer.requires_grad_(False), dict(NOISE_SCHEDULE))


def _tiny_pixart(**_) -> ModelHandle:
    transformer = build_transformer("pixart", "tiny").requires_grad_(False)
    return ModelHandle(transformer, dict(NOISE_SCHEDULE), vae=tiny_vae().requires_grad_(False))


def _tiny_pipeline(backbone: str, **defaults) -> Callable[..., ModelHandle]:
    def load(seed: int = 0, **options) -> ModelHandle:
        return handle_of(tiny_pipeline(backbone, seed=seed, **{**defaults, **options}), backbone)

    return load


def _tiny_flow(build: Callable, backbone: str, **shape) -> Callable[..., ModelHandle]:
    def load(seed: int = 0, **options) -> ModelHandle:
        return handle_of(build(seed=seed), backbone, **{**shape, **options})

    return load


def _hub(pretrained: str, backbone: str) -> Callable[..., ModelHandle]:
    def load(pretrained: str = pretrained, dtype: str = "float32", device: str = "cpu", **shape) -> ModelHandle:
        return handle_of(load_pipeline(str(pretrained), backbone, dtype, device), backbone, **shape)

    return load


# name -> loader(**options). The Hydra `model` group has one file per name (conf/model/NAME.yaml).
MODELS: dict[str, Callable[..., ModelHandle]] = {
    "reference": lambda path=None, **_: load_reference(path),
    "tiny": _tiny_dit,  # a random 2-block DiT shaped like the reference (16 x 16 digits, 10 classes)
    "tiny_pixart": _tiny_pixart,  # a random 2-block PixArt on 4 x 8 x 8 latents with a tiny VAE
    "dit_tiny": _tiny_pipeline("dit", size="tiny", sample_size=8),  # tiny random DiTPipeline
    "dit_s2_random": _tiny_pipeline("dit", size="S/2", sample_size=32),  # DiT-S/2 shape, random weights
    "flux_tiny": _tiny_flow(tiny_flux_pipeline, "flux", height=16, width=16),  # 4 x 8 x 8 latents: 16 tokens
    "wan_tiny": _tiny_flow(tiny_wan_pipeline, "wan", height=32, width=32, frames=5),  # 4 x 2 x 8 x 8 latents
    "dit_xl_256": _hub("facebook/DiT-XL-2-256", "dit"),
    "pixart_alpha_512": _hub("PixArt-alpha/PixArt-XL-2-512x512", "pixart"),
    "flux_schnell": _hub("black-forest-labs/FLUX.1-schnell", "flux"),
    "wan_1_3b": _hub("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "wan"),
}
ALIASES = {"tiny-pixart": "tiny_pixart", "tiny-flux": "flux_tiny", "tiny-wan": "wan_tiny"}


def load_model(name_or_path: str | Path | Mapping | None = None, path: str | Path | None = None, **options):
    """A model to sample, learn and evaluate on, by name, by folder, or from a Hydra `model` config.

    Args:
        name_or_path: a key of `MODELS` (`reference`, `tiny`, `dit_tiny`, `flux_tiny`, `dit_xl_256`, ...), a folder
            (a saved stock pipeline, or `transformer/` + `noise_schedule.json`), or a `model` config mapping
            (`{"_target_": ..., ...}`, as `python train.py model=...` composes it).
        path: the folder, as `model=local model.path=DIR` passes it.
        **options: `height`, `width` (pixels) and `frames` for latent shapes; `dtype`, `device`, `pretrained`
            for the hub-backed names; `seed` and size options for the random tiny ones.

    Example:
        >>> ref = load_model("reference")
        >>> ref.num_classes, ref.sample_shape
        (10, (1, 16, 16))
    """
    if isinstance(name_or_path, Mapping):
        loaded = instantiate(dict(name_or_path))
        return loaded if isinstance(loaded, ModelHandle) else handle_of(loaded)
    if (name_or_path is None) == (path is None):
        raise ValueError("Name exactly one model: load_model(NAME) or load_model(path=DIR).")
    target = str(path if path is not None else name_or_path)
    key = ALIASES.get(target, target)
    if path is None and key in MODELS:
        return MODELS[key](**options)
    folder = Path(target).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"No model named {target!r}: not one of {sorted(MODELS)} and no folder of that name. "
            "Pass a saved pipeline folder, or a transformer folder with noise_schedule.json beside it "
            "(model=local model.path=DIR)."
        )
    if (folder / "model_index.json").is_file():
        backbone = pipeline_backbone(folder)
        dtype, device = options.pop("dtype", "float32"), options.pop("device", "cpu")
        return handle_of(load_pipeline(str(folder), backbone, dtype, device), backbone, **options)
    return _from_transformer_folder(folder, **options)

"""One way to name a model, for every task: `load_model(name_or_path, **options)` -> a `ModelHandle` handle.

A name is a key of `MODELS` (the same names as the Hydra `model` config group: `python train.py model=NAME`,
`python infer.py model=NAME`, `python -m diffsparse.evaluate --model NAME`). A path is a folder holding either a
saved stock pipeline (`model_index.json`: DiT, PixArt-alpha, FLUX, Wan2.1), or a transformer folder
(`transformer/`) with its training noise schedule beside it (`noise_schedule.json`, or a `scheduler/` folder), and
for latent models a `vae/` folder. Class counts come from the model's config; latent shapes from the pipeline's
own defaults or from the `height` / `width` / `frames` options, never from constants.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import diffusers
from hydra.utils import instantiate

from diffsparse.backbones import BACKBONES, backbone_for, backbone_named, tiny_pipeline
from diffsparse.backbones.dit import build_dit
from diffsparse.backbones.pixart import build_pixart
from diffsparse.backbones.tiny_parts import tiny_vae
from diffsparse.models.folder import dtype_of, load_transformer_folder
from diffsparse.models.handle import ModelHandle
from diffsparse.models.sampling import is_flow_matching
from diffsparse.reference.digits import IMAGE_SIZE, NUM_CLASSES
from diffsparse.reference.flux_digits import FLUX_DIGITS_DIR
from diffsparse.reference.flux_digits import IMAGE_SIZE as FLUX_DIGITS_SIZE
from diffsparse.reference.model import DEFAULT_GUIDANCE, NOISE_SCHEDULE, load_reference


def pipeline_backbone(path: Path) -> str:
    """The backbone of a saved pipeline folder, from the class named in its `model_index.json` (its stock
    pipeline's class, or a sibling of it: `PixArtSigmaPipeline`, `FluxImg2ImgPipeline`, ...)."""
    name = json.loads((Path(path) / "model_index.json").read_text())["_class_name"]
    for spec in BACKBONES.values():
        cls = spec.pipeline_class
        if cls and (name == cls or name.startswith(cls.removesuffix("Pipeline").removesuffix("Alpha"))):
            return spec.name
    supported = sorted(s.pipeline_class for s in BACKBONES.values() if s.pipeline_class)
    raise ValueError(f"{path} holds a {name}; supported pipelines: {supported}.")


def handle_of(pipe, backbone: str | None = None, height=None, width=None, frames=None) -> ModelHandle:
    """The model handle of a stock pipeline: its transformer (frozen), VAE, training noise schedule and latent
    shape; the pipeline itself is kept for `infer.py`'s stock-pipeline sampling."""
    spec = backbone_named(backbone) if backbone else backbone_for(pipe.transformer)
    shape_options = dict(height=height, width=width, frames=frames)
    transformer = pipe.transformer.eval().requires_grad_(False)
    if is_flow_matching(pipe.scheduler.config):  # the scheduler's whole config (FLUX, Wan)
        noise_schedule = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
        noise_schedule["_class_name"] = type(pipe.scheduler).__name__
    else:
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "trained_betas")
        noise_schedule = {k: pipe.scheduler.config[k] for k in keys if k in pipe.scheduler.config}
    # Latents of one sample as the stock pipeline makes them (None: the transformer's config says)
    shape = spec.latent_shape(pipe, height, width, frames) if spec.latent_shape else None
    vae = pipe.vae.eval().requires_grad_(False)
    names = {"height": "height", "width": "width", "frames": "num_frames"}
    options = {names[k]: v for k, v in shape_options.items() if v is not None}
    return ModelHandle(transformer, noise_schedule, vae=vae, shape=shape, pipeline=pipe, pipeline_options=options)


def load_pipeline(pretrained: str, backbone: str = "dit", dtype: str = "float32", device: str = "cpu"):
    """`from_pretrained` of the stock pipeline for `backbone`, from a local folder or a hub id.

    A hub id needs network access (or the hub cache); where it is missing the error says what to do.
    """
    spec = backbone_named(backbone)
    if spec.pipeline_class is None:
        raise ValueError(f"Backbone {backbone!r} has no stock pipeline to load; load its transformer folder instead.")
    cls = getattr(diffusers, spec.pipeline_class)
    local = Path(pretrained).expanduser()
    if (str(pretrained).startswith((".", "/", "~")) or local.exists()) and not (local / "model_index.json").is_file():
        raise FileNotFoundError(
            f"No diffusers pipeline at {local} (no model_index.json). Save one with `pipe.save_pretrained(path)` "
            "or download it with `huggingface-cli download <id> --local-dir <path>` on a machine with network."
        )
    try:
        pipe = cls.from_pretrained(str(local) if local.exists() else pretrained, dtype=dtype_of(dtype))
    except OSError as e:
        raise OSError(
            f"Could not load {pretrained!r} with {cls.__name__}.from_pretrained: {e}\n"
            "Without network access, download the weights elsewhere (`huggingface-cli download "
            f"{pretrained} --local-dir DIR`), copy DIR here and pass model.path=DIR (or model.pretrained=DIR)."
        ) from e
    return pipe.to(device)


def _tiny_dit() -> ModelHandle:
    transformer = build_dit("tiny", sample_size=IMAGE_SIZE, in_channels=1, num_classes=NUM_CLASSES)
    return ModelHandle(transformer.requires_grad_(False), dict(NOISE_SCHEDULE))


def _tiny_pixart() -> ModelHandle:
    transformer = build_pixart("tiny").requires_grad_(False)
    return ModelHandle(transformer, dict(NOISE_SCHEDULE), vae=tiny_vae().requires_grad_(False))


def _tiny(backbone: str, shape: dict | None = None, **defaults) -> Callable[..., ModelHandle]:
    """A loader of the backbone's tiny random stock pipeline (`defaults`: its builder's options), at the latent
    `shape` options (`height`, `width`, `frames`) unless the call chooses others."""
    shape_defaults = shape or {}

    def load(seed: int = 0, **options) -> ModelHandle:
        chosen = {k: options.pop(k) for k in ("height", "width", "frames") if k in options}
        pipe = tiny_pipeline(backbone, seed=seed, **{**defaults, **options})
        return handle_of(pipe, backbone, **{**shape_defaults, **chosen})

    return load


def _digits_flux(path: str | Path | None = None, **options) -> ModelHandle:
    folder = Path(path) if path is not None else FLUX_DIGITS_DIR
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"No FLUX digits pipeline at {folder}: train one with `python train.py --config-name "
                                "flux_digits` and pass its folder (path=DIR).")  # fmt: skip
    return load_model(path=folder, **{"height": FLUX_DIGITS_SIZE, "width": FLUX_DIGITS_SIZE, **options})


def _hub(pretrained: str, backbone: str) -> Callable[..., ModelHandle]:
    def load(pretrained: str = pretrained, dtype: str = "float32", device: str = "cpu", **shape) -> ModelHandle:
        return handle_of(load_pipeline(str(pretrained), backbone, dtype, device), backbone, **shape)

    return load


# name -> loader(**options). The Hydra `model` group has one file per name (conf/model/NAME.yaml).
MODELS: dict[str, Callable[..., ModelHandle]] = {
    "reference": lambda path=None: load_reference(path),
    "digits_flux": _digits_flux,  # the shipped FLUX-architecture digits model (32 x 32, captions)
    "tiny": _tiny_dit,  # a random 2-block DiT shaped like the reference (16 x 16 digits, 10 classes)
    "tiny_pixart": _tiny_pixart,  # a random 2-block PixArt on 4 x 8 x 8 latents with a tiny VAE
    "dit_tiny": _tiny("dit", size="tiny", sample_size=8),  # tiny random DiTPipeline
    "dit_s2_random": _tiny("dit", size="S/2", sample_size=32),  # DiT-S/2 shape, random weights
    "flux_tiny": _tiny("flux", dict(height=16, width=16)),  # 4 x 8 x 8 latents: 16 tokens
    "wan_tiny": _tiny("wan", dict(height=32, width=32, frames=5)),  # 4 x 2 x 8 x 8 latents
    "dit_xl_256": _hub("facebook/DiT-XL-2-256", "dit"),
    "pixart_alpha_512": _hub("PixArt-alpha/PixArt-XL-2-512x512", "pixart"),
    "flux_schnell": _hub("black-forest-labs/FLUX.1-schnell", "flux"),
    "wan_1_3b": _hub("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "wan"),
}
ALIASES = {
    "tiny-pixart": "tiny_pixart",
    "tiny-flux": "flux_tiny",
    "tiny-wan": "wan_tiny",
    "digits-flux": "digits_flux",
}

# How a named model is meant to be sampled, where it differs from the rest: the evaluation's and the learn task's
# step count, guidance, caption embeddings and feature network when none is given.
RUN_SETTINGS = {
    "reference": dict(feature_net="digits"),
    "digits_flux": dict(
        sampler="flow",
        num_steps=20,
        guidance=1.0,
        feature_net="digits",
        captions=str(FLUX_DIGITS_DIR / "captions.safetensors"),
    ),  # fmt: skip
    **{name: dict(sampler="flow") for name in ("flux_tiny", "wan_tiny", "flux_schnell", "wan_1_3b")},
}


def run_settings(model: str | Mapping | None) -> dict:
    """The sampler (flow for a flow-matching model, else ddim), step count, guidance scale, caption embeddings
    (None: the user's) and feature network (None: the evaluation's choice) to run `model` with by default: a
    name, a folder or a Hydra `model` config. Read from files only; nothing is loaded."""
    if isinstance(model, Mapping):
        model = model.get("name_or_path") or model.get("path")
    key = ALIASES.get(str(model), str(model)) if model is not None else None
    settings = dict(sampler="ddim", num_steps=50, guidance=DEFAULT_GUIDANCE, captions=None, feature_net=None)
    config = Path(str(model)).expanduser() / "scheduler" / "scheduler_config.json" if model is not None else None
    if config is not None and config.is_file() and is_flow_matching(json.loads(config.read_text())):
        settings["sampler"] = "flow"
    return {**settings, **RUN_SETTINGS.get(key, {})}


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
        try:
            return MODELS[key](**options)
        except TypeError as e:  # an option this loader (or the builder it calls) does not take
            if "unexpected keyword argument" not in str(e) and "positional argument" not in str(e):
                raise
            raise ValueError(f"load_model({key!r}) does not take the options {sorted(options)}: {e}") from e
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
    return load_transformer_folder(folder, **options)

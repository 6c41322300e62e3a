"""What every task shares: the model of the `model` config group, and refusing unset mandatory settings."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from diffsparse.models.handle import ModelHandle
from diffsparse.models.loading import load_model

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


def load_configured_model(cfg: DictConfig) -> ModelHandle:
    """The model of the `model` config group (`model=NAME`, or `model=local model.path=DIR`)."""
    return load_model(OmegaConf.to_container(cfg.model, resolve=True))

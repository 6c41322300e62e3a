"""`python train.py --config-name reference` / `second_model` / `feature_net`: train the digits models."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from diffsparse.grids import labelled_grid
from diffsparse.reference.digits import NUM_CLASSES
from diffsparse.reference.featurenet import FEATURE_NET_DIR, train_feature_net
from diffsparse.reference.model import ARCHITECTURE, NOISE_SCHEDULE
from diffsparse.reference.modelcard import measure, write_card
from diffsparse.reference.training import train_reference

# the `architecture:` keys of the config (the rest of ARCHITECTURE is fixed by the digits)
_SETTABLE = ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size")


def train_reference_model(cfg: DictConfig) -> dict:
    """Train the feature network and a DiT into `output_dir`, then write the model card.

    Today's reference by default. The config can also train another model of its family (conf/second_model.yaml):
    `architecture` and `beta_schedule` set the model, `model_dir` its folder inside `output_dir` (`.`: output_dir
    itself), `feature_net_epochs: 0` measures with the shipped feature network instead of training one, and
    `card.readme: false` measures the dense samples (quality.json, samples.png) without writing the reference's
    README card, whose text describes the reference.
    """
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    model_dir = out / cfg.get("model_dir", "digits_dit")
    if cfg.feature_net_epochs:
        feature_dir = out / "digits_classifier"
        feature_net = train_feature_net(feature_dir, epochs=cfg.feature_net_epochs, seed=cfg.seed)
    else:
        feature_dir, feature_net = FEATURE_NET_DIR, {"shipped": str(FEATURE_NET_DIR)}
    architecture = {k: cfg.get("architecture", {}).get(k, ARCHITECTURE[k]) for k in _SETTABLE}
    recipe = train_reference(
        model_dir,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup=cfg.warmup,
        ema_decay=cfg.ema_decay,
        label_dropout=cfg.label_dropout,
        seed=cfg.seed,
        beta_schedule=cfg.get("beta_schedule", NOISE_SCHEDULE["beta_schedule"]),
        **architecture,
    )
    result = {"feature_net": feature_net, "reference": recipe}
    if cfg.card.get("readme", True):
        card = write_card(
            model_dir, feature_dir, cfg.card.sweep_samples, steps=cfg.card.steps, samples=cfg.card.samples
        )
        result["model_card"] = str(card)
    elif cfg.card.samples:
        result["quality"] = _measure_dense(model_dir, feature_dir, steps=cfg.card.steps, samples=cfg.card.samples)
    return result


def _measure_dense(model_dir: Path, feature_dir: Path, **kwargs) -> dict:
    """The model card's dense measurement alone: quality.json and samples.png in `model_dir`."""
    m = measure(model_dir, feature_dir, **kwargs)
    labelled_grid(m["images"][:100], model_dir / "samples.png", [str(c) for c in range(NUM_CLASSES)])
    summary = {k: (v if isinstance(v, int | float | list) else str(v)) for k, v in m.items() if k != "images"}
    summary["feature_net"] = str(feature_dir)
    (model_dir / "quality.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def train_feature_network(cfg: DictConfig) -> dict:
    """Train the digit classifier used for FD and class accuracy into `output_dir`."""
    return train_feature_net(cfg.output_dir, epochs=cfg.epochs, held_out=cfg.held_out, seed=cfg.seed)

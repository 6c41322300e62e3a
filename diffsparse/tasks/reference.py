"""`python train.py --config-name reference` / `feature_net`: train the shipped digits models."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from diffsparse.reference.featurenet import train_feature_net
from diffsparse.reference.modelcard import write_card
from diffsparse.reference.training import train_reference


def train_reference_model(cfg: DictConfig) -> dict:
    """Train the feature network and the reference DiT into `output_dir`, then write the model card."""
    out = Path(cfg.output_dir)
    feature_net = train_feature_net(out / "digits_classifier", epochs=cfg.feature_net_epochs, seed=cfg.seed)
    recipe = train_reference(
        out / "digits_dit",
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup=cfg.warmup,
        ema_decay=cfg.ema_decay,
        label_dropout=cfg.label_dropout,
        seed=cfg.seed,
    )
    card = write_card(
        out / "digits_dit",
        out / "digits_classifier",
        cfg.card.sweep_samples,
        steps=cfg.card.steps,
        samples=cfg.card.samples,
    )
    return {"feature_net": feature_net, "reference": recipe, "model_card": str(card)}


def train_feature_network(cfg: DictConfig) -> dict:
    """Train the digit classifier used for FD and class accuracy into `output_dir`."""
    return train_feature_net(cfg.output_dir, epochs=cfg.epochs, held_out=cfg.held_out, seed=cfg.seed)

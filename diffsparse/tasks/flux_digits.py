"""`python train.py --config-name flux_digits`: train the FLUX-architecture digits model, save it as a stock
`FluxPipeline` folder, and measure its samples."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from diffsparse.reference.digits import load_digits
from diffsparse.reference.flux_card import write_card
from diffsparse.reference.flux_digits import (
    IMAGE_SIZE,
    encode_all,
    train_autoencoder,
    train_transformer,
    untrained_pipeline,
)
from diffsparse.reference.training import plot_loss


def train_flux_digits(cfg: DictConfig) -> dict:
    """Train the autoencoder, then the transformer; save the pipeline into `output_dir`; write training.json, the
    loss curves and, with `card.samples`, the model card (`reference.flux_card`: README.md, quality.json,
    samples.png with the class accuracy and FD of its samples, and the caption embeddings)."""
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    images, labels = load_digits(IMAGE_SIZE)
    pipe = untrained_pipeline(OmegaConf.to_container(cfg.architecture), seed=cfg.seed)
    vae_history = train_autoencoder(pipe.vae, images, cfg.autoencoder.steps, cfg.autoencoder.batch_size,
                                    cfg.autoencoder.lr, seed=cfg.seed)  # fmt: skip
    latents, text = encode_all(pipe, images)
    history = train_transformer(pipe, latents, labels, text, cfg.steps, cfg.batch_size, cfg.lr, cfg.warmup,
                                cfg.ema_decay, seed=cfg.seed)  # fmt: skip
    pipe.save_pretrained(out, safe_serialization=True)
    plot_loss(history, out / "loss.png", "FLUX digits: flow-matching loss", "velocity MSE")
    plot_loss(vae_history, out / "autoencoder_loss.png", "FLUX digits: autoencoder loss", "reconstruction MSE")
    recipe = {"config": OmegaConf.to_container(cfg, resolve=True), "threads": torch.get_num_threads(),
              "train_minutes": round(history[-1]["minutes"], 1), "final_loss": history[-1]["loss"],
              "autoencoder_final_loss": vae_history[-1]["loss"]}  # fmt: skip
    (out / "training.json").write_text(json.dumps(recipe, indent=2) + "\n")
    result = {"model": str(out), "training": recipe}
    if cfg.card.samples:  # the card (README.md), quality.json, samples.png and the caption embeddings
        result["quality"] = write_card(out, cfg.card.samples, cfg.card.steps, seed=cfg.seed)
    return result

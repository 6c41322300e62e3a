"""The FLUX digits model's card and captions: `python -m diffsparse.reference.flux_card MODEL_DIR` measures the
model's own samples (class accuracy and FD by the digits feature network) and writes MODEL_DIR/README.md,
quality.json and samples.png, and the caption embeddings schedules are learned and evaluated on
(MODEL_DIR/captions.txt and captions.safetensors, each caption with its class)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import FluxPipeline

from diffsparse.files import atomic_path
from diffsparse.grids import labelled_grid
from diffsparse.models.captions import CAPTION_LABELS, encode_captions, save_captions
from diffsparse.reference.digits import NUM_CLASSES
from diffsparse.reference.flux_digits import (
    ARCHITECTURE,
    CAPTION_TEMPLATES,
    MAX_SEQUENCE_LENGTH,
    caption,
    measure_samples,
)

CAPTION_CYCLES = 3  # 180 captions: enough for the recipe's 96 training + 64 validation conditions


def write_captions(pipe, model_dir: Path) -> Path:
    """captions.txt ('CLASS<tab>caption') and their embeddings, captions.safetensors: caption i is of class i % 10
    with template (i // 10) % 6, `CAPTION_CYCLES` times over, so that any run of 10 conditions holds every class."""
    count = NUM_CLASSES * len(CAPTION_TEMPLATES) * CAPTION_CYCLES
    labels = [i % NUM_CLASSES for i in range(count)]
    texts = [caption(c, (i // NUM_CLASSES) % len(CAPTION_TEMPLATES)) for i, c in enumerate(labels)]
    with atomic_path(model_dir / "captions.txt") as tmp:
        tmp.write_text("".join(f"{c}\t{t}\n" for c, t in zip(labels, texts, strict=True)))
    tensors = encode_captions(pipe, texts, MAX_SEQUENCE_LENGTH)
    tensors[CAPTION_LABELS] = torch.tensor(labels)
    return save_captions(model_dir / "captions.safetensors", tensors, texts)


def _fmt(estimate) -> str:
    return estimate if isinstance(estimate, str) else str(estimate)


def card_text(training: dict, quality: dict, parameters: int, megabytes: float) -> str:
    """The README.md of the model folder."""
    cfg = training["config"]
    per_class = " | ".join(f"{a:.2f}" for a in quality["per_class_accuracy"])
    arch = {**ARCHITECTURE, **cfg.get("architecture", {})}
    return f"""# digits-FLUX: a FLUX-architecture model of the digits, trained by diffsparse

A stock `FluxPipeline` (`FluxTransformer2DModel`, `AutoencoderKL`, tiny CLIP and T5 text encoders) that draws the
digit a short caption names ("the digit seven", "a drawing of a seven", ...), so that caching schedules can be
judged on a trained FLUX-family model with no download. Load it with `FluxPipeline.from_pretrained(THIS_FOLDER)`
or `diffsparse.load_model("digits-flux")`.

## Model

- 32 x 32 grey images in a 4-channel latent space at half the resolution (a small `AutoencoderKL`, no attention),
  packed 2 x 2 as FLUX does: 64 image tokens and {MAX_SEQUENCE_LENGTH} text tokens.
- Transformer: {arch["num_layers"]} dual-stream and {arch["num_single_layers"]} single-stream blocks,
  {arch["num_attention_heads"]} heads of {arch["attention_head_dim"]}, rotary axes {list(arch["axes_dims_rope"])};
  {parameters / 1e6:.2f} M parameters in all; {megabytes:.1f} MB of float32 safetensors for the folder.
- Text encoders: the tiny CLIP and T5 the project builds offline, frozen at their random weights (a 30-word
  vocabulary; each caption still gets its own embedding, and the transformer learns to read them).
- Captions: {len(CAPTION_TEMPLATES)} templates x 10 digit words (`captions.txt`; `captions.safetensors` holds
  their embeddings and classes for `learn.captions=` and `--captions`).

## Training

- Autoencoder: {cfg["autoencoder"]["steps"]} steps of batch {cfg["autoencoder"]["batch_size"]}, learning rate
  {cfg["autoencoder"]["lr"]}; final reconstruction loss {training["autoencoder_final_loss"]:.4f}
  (`autoencoder_loss.png`).
- Transformer: rectified flow matching (velocity target, logit-normal times), {cfg["steps"]} steps of batch
  {cfg["batch_size"]}; AdamW, peak learning rate {cfg["lr"]} with {cfg["warmup"]} warm-up steps and cosine decay;
  EMA {cfg["ema_decay"]} (the shipped weights); seed {cfg["seed"]}. Final loss {training["final_loss"]:.4f}
  (mean of the last 50 steps; `loss.png`).
- {training["train_minutes"]} minutes of transformer training on {training["threads"]} CPU threads.
- Reproduce: `python train.py --config-name flux_digits`.

## Sample quality (dense sampling)

Measured by `python -m diffsparse.reference.flux_card MODEL_DIR`: {quality["samples"]} samples (sample i: digit
i % 10, caption template (i // 10) % 6), flow-matching Euler {quality["steps"]} steps, no guidance, noise seed
{quality["seed"]}; the digits feature network (`../digits_classifier`) averages each sample down to its 16 x 16.
Brackets: 95 % bootstrap intervals.

| | value |
|---|---|
| class accuracy (feature network) | {_fmt(quality["accuracy"])} |
| FD to all real digits | {_fmt(quality["fd"])} |

Per-class accuracy, digits 0-9: {per_class}.

![samples: one column per digit, one row per caption template](samples.png)
"""


def write_card(model_dir: str | Path, samples: int = 500, steps: int = 20, seed: int = 0) -> dict:
    """Measure the model in `model_dir` (a folder `train.py --config-name flux_digits` wrote, with its
    training.json) and write its card, quality.json, samples.png and captions. Returns the quality numbers."""
    model_dir = Path(model_dir)
    if not (model_dir / "training.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no training.json: train it with python train.py --config-name "
                                "flux_digits (the folder it writes holds one).")  # fmt: skip
    pipe = FluxPipeline.from_pretrained(model_dir)
    m = measure_samples(pipe, steps, samples, seed=seed)
    rows = len(CAPTION_TEMPLATES)
    shown = min(len(m["images"]), rows * NUM_CLASSES)
    labels = [t.format("…") for t in CAPTION_TEMPLATES][: -(-shown // NUM_CLASSES)]
    labelled_grid(m["images"][:shown], model_dir / "samples.png", [str(c) for c in range(NUM_CLASSES)], labels,
                  title=f"digits-FLUX, {steps} Euler steps: columns the digit, rows the caption")  # fmt: skip
    quality = {k: (v if isinstance(v, int | float | list) else str(v)) for k, v in m.items() if k != "images"}
    quality["seed"] = seed
    with atomic_path(model_dir / "quality.json") as tmp:
        tmp.write_text(json.dumps(quality, indent=2) + "\n")
    write_captions(pipe, model_dir)
    parts = [pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2]
    parameters = sum(p.numel() for part in parts for p in part.parameters())
    megabytes = sum(f.stat().st_size for f in model_dir.rglob("*.safetensors") if f.name != "captions.safetensors")
    training = json.loads((model_dir / "training.json").read_text())
    with atomic_path(model_dir / "README.md") as tmp:
        tmp.write_text(card_text(training, quality, parameters, megabytes / 2**20))
    return quality


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffsparse.reference.flux_card", description=__doc__)
    parser.add_argument("model_dir", help="a folder written by python train.py --config-name flux_digits")
    parser.add_argument("--samples", type=int, default=500, help="samples measured (default: 500)")
    parser.add_argument("--steps", type=int, default=20, help="flow-matching Euler steps (default: 20)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.samples < 1 or args.steps < 1:
        parser.error("--samples and --steps must be at least 1")
    quality = write_card(args.model_dir, args.samples, args.steps, args.seed)
    print(json.dumps(quality, indent=2))


if __name__ == "__main__":
    main()

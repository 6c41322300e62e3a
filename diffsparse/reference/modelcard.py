"""The reference model's card: what it is, how it was trained, and how good its own samples are.

`python -m diffsparse.reference.modelcard [MODEL_DIR]` measures the dense model (50 DDIM steps, 500 samples, 50
per class) with the feature network and writes MODEL_DIR/README.md and MODEL_DIR/samples.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffsparse.evaluate.metrics import fd_estimate, mean_estimate
from diffsparse.files import atomic_path
from diffsparse.grids import labelled_grid
from diffsparse.models.sampling import initial_noise, sample_batched
from diffsparse.reference.digits import NUM_CLASSES, load_digits, split, to_unit_range
from diffsparse.reference.featurenet import FEATURE_NET_DIR, load_feature_net
from diffsparse.reference.model import ARCHITECTURE, DEFAULT_GUIDANCE, REFERENCE_DIR, load_reference


def measure(
    model_dir: Path,
    feature_net_dir: Path,
    steps: int = 50,
    samples: int = 500,
    guidance: float = DEFAULT_GUIDANCE,
    seed: int = 0,
) -> dict:
    """Class accuracy and FD of the dense model's samples, plus FD of real held-out digits as the floor."""
    ref = load_reference(model_dir)
    net = load_feature_net(feature_net_dir)
    images, labels = load_digits()
    with torch.no_grad():
        real = net.features(images).numpy()
    labels_gen = torch.arange(samples) % NUM_CLASSES
    noise = initial_noise(samples, ref.sample_shape, seed)
    x = sample_batched(ref.transformer, ref.scheduler("ddim"), labels_gen, noise, steps, guidance_scale=guidance)
    with torch.no_grad():
        feats = net.features(x.clamp(-1, 1))
        correct = (net.head(feats).argmax(1) == labels_gen).double()
    per_class = [float(correct[labels_gen == c].mean()) for c in range(NUM_CLASSES)]
    _, held_out = split(labels, 0.2, seed=0)
    n_floor = min(samples, len(held_out))
    return {
        "steps": steps,
        "samples": samples,
        "guidance": guidance,
        "seed": seed,
        "accuracy": mean_estimate(correct),
        "per_class_accuracy": per_class,
        "fd": fd_estimate(feats.numpy(), real),
        "fd_real_held_out": fd_estimate(real[held_out[:n_floor].numpy()], real),
        "images": to_unit_range(x),
    }


SWEEP = (1.0, 1.25, 1.5, 2.5, 4.0)


def write_card(
    model_dir: str | Path = REFERENCE_DIR,
    feature_net_dir: str | Path | None = None,
    sweep_samples: int = 200,
    **kwargs,
) -> Path:
    """Measure the model in `model_dir` and write its README.md, samples.png and quality.json there.

    `feature_net_dir` defaults to the `digits_classifier` folder beside `model_dir`, else the shipped one.
    """
    model_dir = Path(model_dir)
    if feature_net_dir is None:
        beside = model_dir.parent / "digits_classifier"
        feature_net_dir = beside if beside.is_dir() else FEATURE_NET_DIR
    m = measure(model_dir, Path(feature_net_dir), **kwargs)
    sweep = []
    for g in SWEEP if sweep_samples else ():
        r = measure(model_dir, Path(feature_net_dir), steps=m["steps"], samples=sweep_samples, guidance=g)
        sweep.append(f"| {g} | {r['accuracy']} | {r['fd']} |")
    labelled_grid(m["images"][:100], model_dir / "samples.png", [str(c) for c in range(NUM_CLASSES)])
    recipe = json.loads((model_dir / "training.json").read_text())
    feature_cfg = json.loads((Path(feature_net_dir) / "config.json").read_text())
    weights = model_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    params = sum(p.numel() for p in load_reference(model_dir).transformer.parameters())
    classes = " | ".join(f"{a:.2f}" for a in m["per_class_accuracy"])
    card = f"""# digits-DiT: the diffsparse reference model

A class-conditional diffusion transformer (diffusers `DiTTransformer2DModel`) trained by diffsparse on
scikit-learn's bundled digits, so that schedules can be judged on a real model with no download.
Load it with `diffsparse.reference.model.load_reference()`; sample it with `diffsparse.models.sampling.sample`.

## Model

- Pixel space, 1 x 16 x 16 (the 8 x 8 digits upsampled bilinearly), values in [-1, 1].
- Patch 2, so 64 tokens; {ARCHITECTURE["num_layers"]} blocks of width \
{ARCHITECTURE["num_attention_heads"] * ARCHITECTURE["attention_head_dim"]} \
({ARCHITECTURE["num_attention_heads"]} heads of {ARCHITECTURE["attention_head_dim"]}); \
{params / 1e6:.2f} M parameters; {weights.stat().st_size / 1e6:.1f} MB of float32 safetensors.
- 10 classes plus the null class 10 for classifier-free guidance; epsilon prediction on DiT's noise schedule
  (1000 linear betas, 1e-4 to 0.02).

## Training

- All 1,797 digits; {recipe["steps"]} steps of batch {recipe["batch_size"]}; AdamW, peak learning rate \
{recipe["lr"]} with {recipe["warmup"]} warm-up steps and cosine decay; gradient clipping at 1; EMA \
{recipe["ema_decay"]} (the shipped weights); labels dropped to the null class with probability \
{recipe["label_dropout"]}; seed {recipe["seed"]}.
- {recipe["train_minutes"]} minutes on {recipe["threads"]} CPU threads; final training loss \
{recipe["final_loss"]:.4f} (mean of the last {recipe.get("log_every", 50)} steps). Loss curve: `loss.png` \
(values in `loss.csv`).
- Reproduce: `python train.py --config-name reference` (this folder is then `outputs/.../digits_dit`).

## Sample quality (dense sampling)

Measured by `python -m diffsparse.reference.modelcard`: {m["samples"]} samples \
({m["samples"] // NUM_CLASSES} per class), DDIM {m["steps"]} steps, guidance {m["guidance"]}, noise seed \
{m["seed"]}. Brackets: 95 % bootstrap intervals.

| | value |
|---|---|
| class accuracy (feature network) | {m["accuracy"]} |
| FD to all real digits | {m["fd"]} |
| FD of {min(m["samples"], 359)} real held-out digits to all real digits (the floor) | {m["fd_real_held_out"]} |

Per-class accuracy, digits 0-9: {classes}.

Guidance matters: this small pixel-space model is best with little of it and falls apart with a lot (our
guess, not checked: its unconditional prediction, learned from a tenth of the batches, is the weak half).
Same measurement, {sweep_samples} samples per row (FD is biased upwards at fewer
samples, so compare rows with each other):

| guidance | class accuracy | FD |
|---|---|---|
{chr(10).join(sweep)}

The feature network (`../digits_classifier`) is a small CNN trained on {feature_cfg["train_images"]} digits; its
accuracy on the {feature_cfg["held_out_images"]} held-out digits is {feature_cfg["held_out_accuracy"]:.4f}.
FD uses its {feature_cfg["features"]}-wide penultimate features.

![samples: one column per class](samples.png)
"""
    path = model_dir / "README.md"
    with atomic_path(path) as tmp:
        tmp.write_text(card)
    summary = {k: (str(v) if not isinstance(v, int | float | list) else v) for k, v in m.items() if k != "images"}
    (model_dir / "quality.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(card)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m diffsparse.reference.modelcard", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", nargs="?", default=str(REFERENCE_DIR), help="folder written by train_reference")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--sweep-samples", type=int, default=200, help="samples per guidance-sweep row (0: no sweep)")
    args = p.parse_args(argv)
    write_card(
        args.model_dir,
        sweep_samples=args.sweep_samples,
        steps=args.steps,
        samples=args.samples,
        guidance=args.guidance,
    )


if __name__ == "__main__":
    main()

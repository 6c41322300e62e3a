"""Training the reference DiT on the digits (`python train.py --config-name reference`)."""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffsparse.reference.digits import NUM_CLASSES, load_digits
from diffsparse.reference.model import NOISE_SCHEDULE, build_reference_transformer

log = logging.getLogger(__name__)


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 1 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_reference(
    output_dir: str | Path,
    steps: int = 6000,
    batch_size: int = 128,
    lr: float = 1e-3,
    warmup: int = 200,
    ema_decay: float = 0.999,
    label_dropout: float = 0.1,
    log_every: int = 50,
    seed: int = 0,
) -> dict:
    """Train the reference DiT with the epsilon-prediction DDPM loss on all 1,797 digits; save the EMA weights.

    Labels are replaced by the null class with probability `label_dropout`, once per sample, so the model also
    learns the unconditional prediction for classifier-free guidance. (The model stays in eval mode: in train mode
    diffusers would drop labels again, independently in every block.)
    """
    from diffusers import DDPMScheduler

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_digits()
    noise_sched = DDPMScheduler(**NOISE_SCHEDULE)
    model = build_reference_transformer(seed).eval()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    history, running, count, start = [], 0.0, 0, time.perf_counter()
    bar = tqdm(range(steps), desc="reference DiT")
    for step in bar:
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        x0, y = images[idx], labels[idx]
        y = torch.where(torch.rand(batch_size, generator=g) < label_dropout, NUM_CLASSES, y)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=g)
        pred = model(noise_sched.add_noise(x0, noise, t), timestep=t, class_labels=y).sample
        loss = F.mse_loss(pred, noise)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - ema_decay)
        running += loss.item()
        count += 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            minutes = (time.perf_counter() - start) / 60
            history.append({"step": step + 1, "loss": running / count, "minutes": minutes})
            bar.set_postfix(loss=f"{running / count:.4f}")
            running, count = 0.0, 0
    minutes = (time.perf_counter() - start) / 60
    ema.save_pretrained(out / "transformer", safe_serialization=True)
    (out / "noise_schedule.json").write_text(json.dumps(NOISE_SCHEDULE, indent=2) + "\n")
    with open(out / "loss.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "minutes"])
        writer.writeheader()
        writer.writerows(history)
    recipe = dict(
        steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, ema_decay=ema_decay,
        label_dropout=label_dropout, seed=seed, train_minutes=round(minutes, 1),
        threads=torch.get_num_threads(), final_loss=history[-1]["loss"],
    )  # fmt: skip
    (out / "training.json").write_text(json.dumps(recipe, indent=2) + "\n")
    _plot_loss(history, out / "loss.png")
    log.info("reference DiT trained in %.1f min, saved to %s", minutes, out)
    return recipe


def _plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history])
    ax.set(xlabel="step", ylabel="epsilon MSE", yscale="log", title="reference DiT training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

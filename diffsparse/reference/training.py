"""Training the reference DiT on the digits (`python train.py --config-name reference`)."""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from diffusers.utils.torch_utils import randn_tensor
from matplotlib.figure import Figure
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR
from tqdm.auto import tqdm

from diffsparse.reference.digits import NUM_CLASSES, load_digits
from diffsparse.reference.model import (
    ARCHITECTURE,
    NOISE_SCHEDULE,
    build_reference_transformer,
    reference_noise_schedule,
)

log = logging.getLogger(__name__)


def warmup_cosine(optimizer: torch.optim.Optimizer, total: int, warmup: int, final: float = 0.01) -> LRScheduler:
    """Linear warm-up to the optimizer's learning rate (step k of `warmup` at (k + 1) / warmup of it), then cosine
    decay to `final` times it at step `total`. Step it once after every optimizer step."""
    peak = optimizer.param_groups[0]["lr"]
    if warmup == 0:
        return CosineAnnealingLR(optimizer, T_max=max(total, 1), eta_min=final * peak)
    ramp = LinearLR(optimizer, start_factor=1 / warmup, total_iters=warmup - 1)
    cosine = CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1), eta_min=final * peak)
    return SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def constant_ema(model: torch.nn.Module, decay: float) -> EMAModel:
    """diffusers' EMA of `model`'s weights at a constant `decay` from the first step: `min_decay=decay` turns off
    its decay warm-up, and `update_after_step=-1` its plain copy of the weights at step 1."""
    return EMAModel(model.parameters(), decay=decay, min_decay=decay, update_after_step=-1)


def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, opt, lr_schedule: LRScheduler, ema: EMAModel) -> None:
    """One training step of the digits models: backward, gradients clipped to norm 1, the optimizer, the learning
    rate schedule, then the EMA."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    lr_schedule.step()
    ema.step(model.parameters())


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
    num_layers: int = ARCHITECTURE["num_layers"],
    num_attention_heads: int = ARCHITECTURE["num_attention_heads"],
    attention_head_dim: int = ARCHITECTURE["attention_head_dim"],
    patch_size: int = ARCHITECTURE["patch_size"],
    beta_schedule: str = NOISE_SCHEDULE["beta_schedule"],
) -> dict:
    """Train the reference DiT with the epsilon-prediction DDPM loss on all 1,797 digits; save the EMA weights.

    Labels are replaced by the null class with probability `label_dropout`, once per sample, so the model also
    learns the unconditional prediction for classifier-free guidance. (The model stays in eval mode: in train mode
    diffusers would drop labels again, independently in every block.)

    The defaults are the shipped reference's recipe; `num_layers`, `num_attention_heads`, `attention_head_dim`,
    `patch_size` and `beta_schedule` (a diffusers DDPM `beta_schedule`, e.g. `squaredcos_cap_v2`) train another
    model of the same family (`python train.py --config-name second_model`).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_digits()
    architecture = dict(
        num_layers=num_layers,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        patch_size=patch_size,
    )
    noise_schedule = reference_noise_schedule(beta_schedule)
    noise_sched = DDPMScheduler(**noise_schedule)
    model = build_reference_transformer(seed, **architecture).eval()
    ema = constant_ema(model, ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    lr_schedule = warmup_cosine(opt, steps, warmup)
    g = torch.Generator().manual_seed(seed)
    history, running, count, start = [], 0.0, 0, time.perf_counter()
    bar = tqdm(range(steps), desc="reference DiT")
    for step in bar:
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        x0, y = images[idx], labels[idx]
        y = torch.where(torch.rand(batch_size, generator=g) < label_dropout, NUM_CLASSES, y)
        noise = randn_tensor(x0.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=g)
        pred = model(noise_sched.add_noise(x0, noise, t), timestep=t, class_labels=y).sample
        loss = F.mse_loss(pred, noise)
        optimizer_step(loss, model, opt, lr_schedule, ema)
        running += loss.item()
        count += 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            minutes = (time.perf_counter() - start) / 60
            history.append({"step": step + 1, "loss": running / count, "minutes": minutes})
            bar.set_postfix(loss=f"{running / count:.4f}")
            running, count = 0.0, 0
    minutes = (time.perf_counter() - start) / 60
    ema.copy_to(model.parameters())  # the shipped weights are the EMA's
    model.save_pretrained(out / "transformer", safe_serialization=True)
    (out / "noise_schedule.json").write_text(json.dumps(noise_schedule, indent=2) + "\n")
    with open(out / "loss.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "minutes"])
        writer.writeheader()
        writer.writerows(history)
    recipe = dict(
        steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, ema_decay=ema_decay,
        label_dropout=label_dropout, seed=seed, train_minutes=round(minutes, 1),
        threads=torch.get_num_threads(), final_loss=history[-1]["loss"],
        architecture=architecture, noise_schedule=noise_schedule,
    )  # fmt: skip
    (out / "training.json").write_text(json.dumps(recipe, indent=2) + "\n")
    plot_loss(history, out / "loss.png", "reference DiT training loss", "epsilon MSE")
    log.info("reference DiT trained in %.1f min, saved to %s", minutes, out)
    return recipe


def plot_loss(history: list[dict], path: Path, title: str, ylabel: str) -> None:
    """A loss curve (`history`: dicts with `step` and `loss`), log scale, as a PNG."""
    fig = Figure(figsize=(5, 3), layout="tight")  # no pyplot: no backend, no global figure to close
    ax = fig.subplots()
    ax.plot([h["step"] for h in history], [h["loss"] for h in history])
    ax.set(xlabel="step", ylabel=ylabel, yscale="log", title=title)
    fig.savefig(path, dpi=100)

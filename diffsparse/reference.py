"""The reference model: a small class-conditional pixel-space DiT trained by the project on the digits.

`load_reference()` is the one call that loads it (no network): a stock diffusers `DiTTransformer2DModel` read with
`from_pretrained` from `diffsparse/assets/digits_dit`, plus the noise schedule it was trained on.
`train_reference(...)` reproduces it (`python train.py --config-name reference`).
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .digits import IMAGE_SIZE, NUM_CLASSES, load_digits

log = logging.getLogger(__name__)

REFERENCE_DIR = Path(__file__).parent / "assets" / "digits_dit"
# A schedule learned for it (50 DDIM steps, half the MACs): `python infer.py` runs it by default. It is stage 1's:
# on held-out samples it beats stage 2's (`learned_ddim50_half.json`) on FD and PSNR at the same L2 (README).
SHIPPED_SCHEDULE = REFERENCE_DIR / "schedules" / "learned_ddim50_half_stage1.json"
# DiT with patch 2 on 16 x 16 x 1 pixels: 64 tokens, 6 blocks of width 128 (4 heads of 32); the null class for
# classifier-free guidance is class 10 (diffusers adds one embedding row past `num_embeds_ada_norm`).
ARCHITECTURE = dict(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=1,
    out_channels=1,
    num_layers=6,
    sample_size=IMAGE_SIZE,
    patch_size=2,
    norm_num_groups=1,
    num_embeds_ada_norm=NUM_CLASSES,
)
# Classifier-free guidance the reference model samples best with (see its model card's sweep).
DEFAULT_GUIDANCE = 1.25
# DiT's own training noise schedule: 1000 linear betas from 1e-4 to 0.02, epsilon prediction.
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


@dataclass
class Reference:
    """A loaded model to sample and learn schedules on: the transformer (eval mode, frozen), its training noise
    schedule and, for latent models, the VAE that decodes its samples.

    Made by `diffsparse.loading.load_model` (by name, folder or config). Class-conditional models (DiT) guide with
    the null class (`num_classes`, from the model's config). Text-conditional ones (PixArt) guide with the empty
    prompt's embedding, `null_conditions` (the transformer's keywords, batch 1; see `diffsparse.captions`).
    """

    transformer: torch.nn.Module
    noise_schedule: dict
    vae: torch.nn.Module | None = None
    null_conditions: dict | None = None
    shape: tuple[int, ...] | None = None  # latents of one sample, when the config does not say (FLUX, Wan)
    pipeline: object | None = None  # the stock pipeline it came from, if any (`infer.py` samples with it)
    pipeline_options: dict = field(default_factory=dict)  # its call's height / width / num_frames, if chosen

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional model, from its config (0 for text-conditional ones). The null class
        of classifier-free guidance is this number (diffusers adds one embedding row past them)."""
        return int(self.transformer.config.get("num_embeds_ada_norm") or 0) if not self.text_conditioned else 0

    @property
    def text_conditioned(self) -> bool:
        from .cache.backbones import backbone_for

        return backbone_for(self.transformer).name != "dit"

    def scheduler(self, name: str = "ddim"):
        from .sampling import make_scheduler

        return make_scheduler(name, self.noise_schedule)

    def probe_inputs(self, size: int | None = None) -> dict:
        """Forward keywords for one image at one step: a CFG pair (its condition and the null one) at timestep 500,
        zero inputs of the model's sample size (or `size` x `size`). MACs are counted on it."""
        from .calls import forward_kwargs

        shape = self.sample_shape if size is None else (*self.sample_shape[:-2], size, size)
        dtype = next(self.transformer.parameters()).dtype
        x = torch.zeros(2, *shape, dtype=dtype)
        if not self.text_conditioned:
            return forward_kwargs(
                self.transformer, x, torch.tensor(500), {"class_labels": torch.tensor([0, self.num_classes])}
            )
        if self.null_conditions is None:
            raise ValueError("A text-conditional model needs null_conditions (its caption embeddings' empty prompt).")
        text = {
            k: v.expand(2, *v.shape[1:]).to(dtype if v.is_floating_point() else v.dtype)
            for k, v in self.null_conditions.items()
        }
        return forward_kwargs(self.transformer, x, torch.tensor(500), text)

    def mac_table(self, size: int | None = None):
        """MACs per unit and level for one image: a CFG pair (its condition and the null one) at one step."""
        from .cache.macs import mac_table

        return mac_table(self.transformer, **self.probe_inputs(size))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples in image space, [-1, 1]: latents through the VAE, pixels as they are."""
        if self.vae is None:
            return x
        cfg = self.vae.config
        if cfg.get("latents_mean") is not None:  # Wan's VAE: per-channel normalised latents
            view = (1, -1) + (1,) * (x.ndim - 2)
            mean = torch.tensor(cfg.latents_mean, dtype=x.dtype, device=x.device).view(view)
            std = torch.tensor(cfg.latents_std, dtype=x.dtype, device=x.device).view(view)
            return self.vae.decode(x * std + mean).sample
        return self.vae.decode(x / cfg.scaling_factor + (cfg.get("shift_factor") or 0.0)).sample

    @property
    def sample_shape(self) -> tuple[int, ...]:
        if self.shape is not None:
            return tuple(self.shape)
        c = self.transformer.config
        return (c.in_channels, c.sample_size, c.sample_size)


def load_reference(path: str | Path | None = None) -> Reference:
    """The shipped reference DiT (or the one trained into `path`), ready to sample."""
    from diffusers import DiTTransformer2DModel

    path = Path(path) if path is not None else REFERENCE_DIR
    weights = path / "transformer" / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"No reference model at {weights}. Train one with `python train.py --config-name reference` "
            f"(about an hour on a 2-core CPU) and pass its output_dir, or reinstall diffsparse (it ships one)."
        )
    transformer = DiTTransformer2DModel.from_pretrained(path / "transformer").eval().requires_grad_(False)
    noise_schedule = json.loads((path / "noise_schedule.json").read_text())
    return Reference(transformer, noise_schedule)


def build_reference_transformer(seed: int = 0) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(**ARCHITECTURE)


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

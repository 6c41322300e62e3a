"""A small FLUX-architecture model of the digits, trained here (`python train.py --config-name flux_digits`).

A stock `FluxTransformer2DModel` (dual-stream and single-stream blocks, rotary positions) learns the digits at
32 x 32 by rectified flow matching, in the latent space of a small `AutoencoderKL` trained first on the same
images (2x down, 4 channels: 64 packed tokens, as many as the reference DiT has). It reads short captions ("the
digit seven", "a drawing of a seven", ...) through the tiny CLIP and T5 text encoders the project builds offline,
kept frozen at their random weights: with a vocabulary of 30 words, a frozen random encoder still gives each
caption its own embedding, and the transformer learns to read them, so training the encoders would add parameters
and nothing the model needs. Everything is saved as a stock `FluxPipeline` folder.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tqdm.auto import tqdm

from diffsparse.backbones.tiny_parts import tiny_clip, tiny_text_encoder
from diffsparse.reference.digits import NUM_CLASSES
from diffsparse.reference.training import constant_ema, optimizer_step, warmup_cosine

log = logging.getLogger(__name__)

FLUX_DIGITS_DIR = Path(__file__).parent / "assets" / "digits_flux"  # the shipped model (a stock FluxPipeline folder)
IMAGE_SIZE = 32
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# captions in the tiny tokenizer's words (`TINY_VOCABULARY`); a class's captions are these with its word
CAPTION_TEMPLATES = ("{}", "the digit {}", "a drawing of a {}", "a photo of the digit {}", "a small {}", "a large {}")
MAX_SEQUENCE_LENGTH = 8  # text tokens: the longest caption and its end-of-sequence token fit

# the transformer (`FluxTransformer2DModel` arguments) and the autoencoder (`AutoencoderKL` arguments)
ARCHITECTURE = dict(
    patch_size=1,
    in_channels=16,  # 2 x 2-packed latents of the 4-channel autoencoder
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)
AUTOENCODER = dict(
    in_channels=1,
    out_channels=1,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    mid_block_add_attention=False,  # 6x faster to train here, and the digits need no attention to reconstruct
    sample_size=IMAGE_SIZE,
    use_quant_conv=False,  # FLUX's own autoencoder has neither
    use_post_quant_conv=False,
)


def caption(label: int, template: int) -> str:
    """Caption `template` (an index of `CAPTION_TEMPLATES`) of digit `label`."""
    return CAPTION_TEMPLATES[template].format(DIGIT_WORDS[label])


def all_captions() -> list[str]:
    """Every caption, class-major: caption i is of class i // len(CAPTION_TEMPLATES)."""
    return [caption(c, k) for c in range(NUM_CLASSES) for k in range(len(CAPTION_TEMPLATES))]


def untrained_pipeline(architecture: dict | None = None, autoencoder: dict | None = None, seed: int = 0):
    """A `FluxPipeline` of the digits model's parts at their initial weights (text encoders: frozen, random)."""
    architecture = {**ARCHITECTURE, **(architecture or {})}
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**architecture)
    vae = AutoencoderKL(**{**AUTOENCODER, **(autoencoder or {})})
    tokenizer, text_encoder = tiny_clip(architecture["pooled_projection_dim"], seed=seed)
    tokenizer_2, text_encoder_2 = tiny_text_encoder(architecture["joint_attention_dim"], seed=seed)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)  # fmt: skip


def train_autoencoder(vae: AutoencoderKL, images: torch.Tensor, steps: int, batch_size: int = 64, lr: float = 1e-3,
                      kl_weight: float = 1e-6, seed: int = 0) -> list[dict]:  # fmt: skip
    """Train `vae` in place to reconstruct `images` (N, 1, H, W) in [-1, 1] (mean squared error and a small KL
    term), then set its `shift_factor` and `scaling_factor` so that the latents' means are zero-mean, unit-variance
    (as FLUX's are). Returns the loss history."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    history, bar = [], tqdm(range(steps), desc="autoencoder")
    vae.train()
    for step in bar:
        x = images[torch.randint(0, len(images), (batch_size,), generator=g)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            history.append({"step": step + 1, "loss": loss.item()})
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    return history


def encode_all(pipe, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The packed, normalised latents of `images` (N, tokens, channels) and the embeddings of every caption
    (`all_captions()` order): what the transformer trains on, computed once."""
    vae = pipe.vae
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
        z = (z - vae.config.shift_factor) * vae.config.scaling_factor
        n, c, h, w = z.shape
        packed = FluxPipeline._pack_latents(z, n, c, h, w)
        embeds, pooled, text_ids = pipe.encode_prompt(all_captions(), prompt_2=None,
                                                      max_sequence_length=MAX_SEQUENCE_LENGTH)  # fmt: skip
        image_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, z.device, z.dtype)
    return packed, {"embeds": embeds, "pooled": pooled, "text_ids": text_ids, "image_ids": image_ids}


def train_transformer(pipe, latents: torch.Tensor, labels: torch.Tensor, text: dict, steps: int,
                      batch_size: int = 128, lr: float = 1e-3, warmup: int = 200, ema_decay: float = 0.999,
                      seed: int = 0) -> list[dict]:  # fmt: skip
    """Train `pipe.transformer` by rectified flow matching (x_s = (1 - s) x0 + s noise, target noise - x0, s
    logit-normal, as FLUX and SD3 train) on the packed `latents` of digits `labels`, each step's caption drawn
    among its class's; leaves the EMA weights in the transformer. Returns the loss history."""
    model = pipe.transformer
    ema = constant_ema(model, ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    lr_schedule = warmup_cosine(opt, steps, warmup)
    g = torch.Generator().manual_seed(seed)
    templates = len(CAPTION_TEMPLATES)
    history, running, count, start = [], 0.0, 0, time.perf_counter()
    bar = tqdm(range(steps), desc="FLUX digits")
    model.train()
    for step in bar:
        idx = torch.randint(0, len(latents), (batch_size,), generator=g)
        which = labels[idx] * templates + torch.randint(0, templates, (batch_size,), generator=g)
        x0, noise = latents[idx], torch.randn(latents[idx].shape, generator=g)
        s = torch.sigmoid(torch.randn(batch_size, generator=g)).view(-1, 1, 1)
        pred = model(hidden_states=(1 - s) * x0 + s * noise, timestep=s.flatten(),
                     encoder_hidden_states=text["embeds"][which], pooled_projections=text["pooled"][which],
                     txt_ids=text["text_ids"], img_ids=text["image_ids"]).sample  # fmt: skip
        loss = F.mse_loss(pred, noise - x0)
        optimizer_step(loss, model, opt, lr_schedule, ema)
        running, count = running + loss.item(), count + 1
        if (step + 1) % 50 == 0 or step + 1 == steps:
            minutes = (time.perf_counter() - start) / 60
            history.append({"step": step + 1, "loss": running / count, "minutes": minutes})
            bar.set_postfix(loss=f"{running / count:.4f}")
            running, count = 0.0, 0
    model.eval()
    ema.copy_to(model.parameters())
    return history


def measure_samples(pipe, steps: int, samples: int, seed: int = 0, batch: int = 50) -> dict:
    """Class accuracy and FD (the shipped digits feature network, which averages the samples down to 16 x 16) of
    `samples` images from the stock pipeline, `steps` flow-matching Euler steps; sample i is of class i % 10, its
    caption template (i // 10) % 6. Returns the numbers and the images in [0, 1]."""
    from diffsparse.evaluate.metrics import fd_estimate, mean_estimate
    from diffsparse.reference.digits import load_digits
    from diffsparse.reference.featurenet import load_feature_net

    net = load_feature_net()
    labels = torch.arange(samples) % NUM_CLASSES
    prompts = [caption(int(c), (i // NUM_CLASSES) % len(CAPTION_TEMPLATES)) for i, c in enumerate(labels)]
    images = []
    for i in tqdm(range(0, samples, batch), desc="samples"):
        g = torch.Generator().manual_seed(seed + i)
        out = pipe(prompts[i : i + batch], height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=steps,
                   max_sequence_length=MAX_SEQUENCE_LENGTH, generator=g, output_type="pt")  # fmt: skip
        images.append(out.images)
    images = torch.cat(images)
    real, _ = load_digits()
    with torch.no_grad():  # the feature network averages the 32 x 32 samples down to its 16 x 16
        feats, real_feats = net.features(images * 2 - 1), net.features(real)
        correct = (net.head(feats).argmax(1) == labels).double()
    return {
        "steps": steps,
        "samples": samples,
        "accuracy": mean_estimate(correct),
        "per_class_accuracy": [float(correct[labels == c].mean()) for c in range(NUM_CLASSES)],
        "fd": fd_estimate(feats.numpy(), real_feats.numpy()),
        "images": images,
    }

"""How a sampling loop calls each backbone: its forward keywords for latents `x` at timestep `t`, and its output
back in the latents' shape.

- DiT, PixArt-alpha: `x` (B, C, H, W) as it is, train timesteps, the output's first C channels (a learned-variance
  half is dropped).
- FLUX: `x` (B, C, H, W) packed into 2 x 2 patches of tokens (B, H/2 * W/2, 4C) with their (0, row, col) position
  ids (as `FluxPipeline` packs its latents), timesteps divided by 1000; the output unpacked again.
- Wan2.1: `x` (B, C, F, H, W) as it is, train timesteps.
"""

from __future__ import annotations

import numpy as np
import torch
from einops import rearrange

from diffsparse.backbones.registry import backbone_for


def image_ids(rows: int, cols: int, device=None) -> torch.Tensor:
    """Position ids (rows * cols, 3) of packed FLUX image tokens: (0, row, col), row-major."""
    r, c = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    return torch.stack([torch.zeros_like(r), r, c], dim=-1).flatten(0, 1).float()


def pack(x: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, H, W) -> FLUX tokens (B, H/2 * W/2, 4C), each token a 2 x 2 patch (channel-major)."""
    return rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=2, q=2)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """FLUX tokens (B, N, 4C) -> latents (B, C, height, width); the inverse of `pack`."""
    return rearrange(tokens, "b (h w) (c p q) -> b c (h p) (w q)", h=height // 2, p=2, q=2)


def _family(transformer: torch.nn.Module) -> str | None:
    """The registry row's name, or None for wrappers that take DiT-style inputs (e.g. a stitched pruned model)."""
    try:
        return backbone_for(transformer).name
    except TypeError:
        return None


def forward_kwargs(transformer: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, conditions: dict) -> dict:
    """The keywords of `transformer.forward` for latents `x` at timestep `t` (a scalar) with `conditions`."""
    family = _family(transformer)
    timestep = torch.as_tensor(t, device=x.device).expand(x.shape[0])
    if family == "flux":
        if transformer.config.guidance_embeds:
            raise NotImplementedError("Guidance-distilled FLUX (dev) needs a guidance input; use FLUX.1-schnell.")
        text = conditions["encoder_hidden_states"]
        return dict(
            hidden_states=pack(x),
            timestep=timestep.to(x.dtype) / 1000,
            img_ids=image_ids(x.shape[-2] // 2, x.shape[-1] // 2, x.device),
            txt_ids=torch.zeros(text.shape[1], 3, device=x.device),
            **conditions,
        )
    kwargs = dict(hidden_states=x, timestep=timestep, **conditions)
    if family == "pixart":
        kwargs.setdefault("added_cond_kwargs", {"resolution": None, "aspect_ratio": None})
    return kwargs


def predict(transformer: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, conditions: dict) -> torch.Tensor:
    """The model's prediction (noise or velocity) for latents `x` at timestep `t`, in the shape of `x`."""
    out = transformer(**forward_kwargs(transformer, x, t, conditions)).sample
    if _family(transformer) == "flux":
        return unpack(out, x.shape[-2], x.shape[-1])
    return out[:, : x.shape[1]]


def set_steps(transformer: torch.nn.Module, scheduler, num_steps: int, x: torch.Tensor) -> None:
    """`scheduler.set_timesteps` as the backbone's stock pipeline calls it: FLUX's sigmas run linearly from 1 to
    1 / num_steps, shifted by the image's token count when the scheduler shifts dynamically (FLUX.1-dev)."""
    if _family(transformer) != "flux":
        scheduler.set_timesteps(num_steps)
        return
    cfg = scheduler.config
    tokens = (x.shape[-2] // 2) * (x.shape[-1] // 2)
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    mu = cfg.base_shift + slope * (tokens - cfg.base_image_seq_len)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)

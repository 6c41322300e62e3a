"""The reference model: a small class-conditional pixel-space DiT trained by the project on the digits.

`load_reference()` is the one call that loads it (no network): a stock diffusers `DiTTransformer2DModel` read with
`from_pretrained` from `diffsparse/reference/assets/digits_dit`, plus the noise schedule it was trained on.
`train_reference(...)` reproduces it (`python train.py --config-name reference`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel

from diffsparse.models.folder import load_transformer_folder
from diffsparse.models.handle import ModelHandle
from diffsparse.reference.digits import IMAGE_SIZE, NUM_CLASSES

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


def load_reference(path: str | Path | None = None) -> ModelHandle:
    """The shipped reference DiT (or the one trained into `path`), ready to sample."""
    path = Path(path) if path is not None else REFERENCE_DIR
    weights = path / "transformer" / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"No reference model at {weights}. Train one with `python train.py --config-name reference` "
            f"(about an hour on a 2-core CPU) and pass its output_dir, or reinstall diffsparse (it ships one)."
        )
    return load_transformer_folder(path)


def build_reference_transformer(seed: int = 0, **architecture) -> DiTTransformer2DModel:
    """The reference DiT's architecture with random weights (seeded by `seed`), to train.

    Keyword arguments override entries of `ARCHITECTURE` (e.g. `num_layers=4`) for another model of the family.
    """
    unknown = sorted(set(architecture) - set(ARCHITECTURE))
    if unknown:
        raise ValueError(f"Unknown architecture settings {unknown}; settable: {sorted(ARCHITECTURE)}.")
    torch.manual_seed(seed)
    return DiTTransformer2DModel(**{**ARCHITECTURE, **architecture})


def reference_noise_schedule(beta_schedule: str = NOISE_SCHEDULE["beta_schedule"]) -> dict:
    """`NOISE_SCHEDULE` with another diffusers `beta_schedule` (`linear`, `scaled_linear`, `squaredcos_cap_v2`,
    ...); `beta_start` and `beta_end` stay (the cosine schedule ignores them)."""
    return {**NOISE_SCHEDULE, "beta_schedule": beta_schedule}

"""FLUX.1 (Black Forest Labs): a flow-matching text-to-image transformer, `FluxTransformer2DModel` in `FluxPipeline`
(CLIP pooled prompt and T5 text tokens).

Dual-stream blocks (joint attention and MLP per stream: image and text units) then single-stream blocks (one unit
each). The loop packs latents `(B, C, H, W)` into 2 x 2 patches of tokens `(B, H/2 * W/2, 4C)` with their
(0, row, col) position ids, as `FluxPipeline` does, passes timesteps divided by 1000, and unpacks the output.
FLUX.1-schnell is guidance-distilled: sampling runs no classifier-free-guidance pairs.

`tiny` sizes are for tests, `bench` is wide enough for wall-clock benchmarks on a CPU, and `schnell` records the
released architecture for reference: it is never built in tests.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from einops import rearrange

from diffsparse.backbones.registry import (
    JOINT,
    JOINT_ATTN,
    MLP,
    PARALLEL_BLOCK,
    SINGLE_STREAM,
    TEXT,
    BackboneSpec,
    BlockList,
    UnitSpec,
    batch_timestep,
    register_backbone,
)
from diffsparse.backbones.tiny_parts import sized, tiny_clip, tiny_text_encoder

# name -> FluxTransformer2DModel arguments; `axes_dims_rope` sums to `attention_head_dim`.
FLUX_SIZES: dict[str, dict] = {
    "tiny": dict(
        patch_size=1,
        in_channels=16,  # 2x2-packed latents of a 4-channel VAE
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    ),
    "bench": dict(
        patch_size=1,
        in_channels=64,
        num_layers=4,
        num_single_layers=8,
        attention_head_dim=64,
        num_attention_heads=8,
        joint_attention_dim=512,
        pooled_projection_dim=256,
        guidance_embeds=False,
        axes_dims_rope=(8, 28, 28),
    ),
    "schnell": dict(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=False,
        axes_dims_rope=(16, 56, 56),
    ),
}


def image_ids(rows: int, cols: int, device=None) -> torch.Tensor:
    """Position ids (rows * cols, 3) of packed image tokens: (0, row, col), row-major."""
    r, c = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    return torch.stack([torch.zeros_like(r), r, c], dim=-1).flatten(0, 1).float()


def pack(x: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, H, W) -> tokens (B, H/2 * W/2, 4C), each token a 2 x 2 patch (channel-major)."""
    return rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=2, q=2)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Tokens (B, N, 4C) -> latents (B, C, height, width); the inverse of `pack`."""
    return rearrange(tokens, "b (h w) (c p q) -> b c (h p) (w q)", h=height // 2, p=2, q=2)


def ids_grid(model: torch.nn.Module, inputs: dict) -> tuple[int, ...] | None:
    """Token grid of packed image tokens from their position ids (`img_ids` (N, 3): _, row, col); None when the
    ids do not form one full grid (e.g. extra reference-image tokens)."""
    ids = inputs.get("img_ids")
    if ids is None:
        return None
    ids = ids[0] if ids.ndim == 3 else ids
    rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    return (rows, cols) if rows * cols == ids.shape[0] else None


def build_flux(size: str = "tiny", seed: int = 0, **overrides) -> FluxTransformer2DModel:
    """A randomly initialised `FluxTransformer2DModel` of the named size, in eval mode.

    Args:
        size: a key of `FLUX_SIZES`.
        seed: torch seed for the random weights.
        **overrides: constructor arguments replacing those of the size.

    Example:
        >>> model = build_flux("tiny")
        >>> model(**flux_example_inputs(model)).sample.shape
        torch.Size([2, 64, 16])
    """
    kwargs = sized(FLUX_SIZES, size, "FLUX", overrides)
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**kwargs).eval()


def flux_example_inputs(
    model, batch: int = 2, height: int = 8, width: int = 8, text_tokens: int = 8, seed: int = 0
) -> dict:
    """Forward keyword arguments for one step of a FLUX transformer on a `height` x `width` grid of packed tokens.

    The timestep is in [0, 1], as `FluxPipeline` passes it (the sigma, not the step index).
    """
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None, :]
    inputs = dict(
        hidden_states=torch.randn(batch, height * width, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, text_tokens, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=img_ids.reshape(height * width, 3),
        txt_ids=torch.zeros(text_tokens, 3),
    )
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5)
    return inputs


def forward_kwargs(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, conditions: dict) -> dict:
    """Packed latents, the sigma (timestep / 1000) and the position ids of image and text tokens."""
    if model.config.guidance_embeds:
        raise NotImplementedError("Guidance-distilled FLUX (dev) needs a guidance input; use FLUX.1-schnell.")
    timestep = batch_timestep(t, x)
    text = conditions["encoder_hidden_states"]
    return dict(
        hidden_states=pack(x),
        timestep=timestep.to(x.dtype) / 1000,
        img_ids=image_ids(x.shape[-2] // 2, x.shape[-1] // 2, x.device),
        txt_ids=torch.zeros(text.shape[1], 3, device=x.device),
        **conditions,
    )


def to_latents(model: torch.nn.Module, sample: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return unpack(sample, x.shape[-2], x.shape[-1])


def set_steps(model: torch.nn.Module, scheduler, num_steps: int, x: torch.Tensor) -> None:
    """Sigmas run linearly from 1 to 1 / num_steps, shifted by the image's token count when the scheduler shifts
    dynamically (FLUX.1-dev)."""
    cfg = scheduler.config
    tokens = (x.shape[-2] // 2) * (x.shape[-1] // 2)
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    mu = cfg.base_shift + slope * (tokens - cfg.base_image_seq_len)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """A stock `FluxPipeline` from tiny random components (FLUX.1-schnell's scheduler), built offline.

    The VAE downsamples 2x, so `height` and `width` must be multiples of 4. Prompts are made of `TINY_VOCABULARY`;
    keep `max_sequence_length` to a few tokens.

    Example:
        >>> pipe = tiny_flux_pipeline()
        >>> out = pipe("a photo of a cat", height=16, width=16, num_inference_steps=3, max_sequence_length=8,
        ...            guidance_scale=0.0, output_type="pt")
        >>> out.images.shape
        torch.Size([1, 3, 16, 16])
    """
    transformer = build_flux("tiny", seed=seed)
    cfg = transformer.config
    torch.manual_seed(seed)
    # FLUX's own VAE has no quant convs and a shift factor, which the pipeline requires.
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=cfg.in_channels // 4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    tokenizer, text_encoder = tiny_clip(cfg.pooled_projection_dim, seed=seed)
    tokenizer_2, text_encoder_2 = tiny_text_encoder(cfg.joint_attention_dim, seed=seed)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0,
        use_dynamic_shifting=False,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def latent_shape(pipe, height=None, width=None, frames=None) -> tuple[int, ...]:
    """FLUX packs 2 x 2 latent patches into tokens: sides are multiples of 2 x the VAE's factor (1024 by default)."""
    scale = pipe.vae_scale_factor
    height = height or pipe.default_sample_size * scale
    width = width or pipe.default_sample_size * scale
    for side in (height, width):
        if side % (2 * scale):
            raise ValueError(f"FLUX height and width must be multiples of {2 * scale} (VAE x 2), got {side}.")
    return (pipe.transformer.config.in_channels // 4, 2 * (height // (2 * scale)), 2 * (width // (2 * scale)))


def encode_captions(pipe, chunk: list[str], max_sequence_length: int) -> dict:
    embeds, pooled, _ = pipe.encode_prompt(chunk, prompt_2=None, max_sequence_length=max_sequence_length)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def _bench_case(size: str, side: int, batch: int, frames: int):
    """`batch` independent samples (no CFG) of `side` x `side` packed tokens and 64 text tokens."""
    model = build_flux(size)
    inputs = flux_example_inputs(model, batch=batch, height=side, width=side, text_tokens=64)
    latents = unpack(inputs["hidden_states"], 2 * side, 2 * side)
    return model, latents, {k: inputs[k] for k in ("encoder_hidden_states", "pooled_projections")}


FLUX = register_backbone(
    BackboneSpec(
        name="flux",
        model_classes=("FluxTransformer2DModel",),
        block_lists=(
            BlockList(
                "transformer_blocks",
                (
                    UnitSpec("attn", JOINT_ATTN, JOINT),
                    UnitSpec("attn", JOINT_ATTN, JOINT, TEXT, name="attn_context"),
                    UnitSpec("ff", MLP),
                    UnitSpec("ff_context", MLP, stream=TEXT),
                ),
            ),
            BlockList("single_transformer_blocks", (UnitSpec("", PARALLEL_BLOCK, SINGLE_STREAM),)),
        ),
        token_grid=ids_grid,
        build=build_flux,
        example_inputs=flux_example_inputs,
        text_conditioned=True,
        # The default ranks by input norm; selector="toca" takes the paper's FLUX weights (A.5.1: lambda_1 = 0,
        # lambda_2 = 1 on the image queries' attention entropy over the text, lambda_3 = 0.25/3, lambda_4 = 0.4,
        # k = 4), the entropy computed on full steps before partial ones (runners.joint_text_entropy).
        selector_defaults=dict(
            name="norm", self_attn_weight=0.0, cross_attn_weight=1.0, reuse_weight=0.25 / 3, bonus=0.4, bonus_kernel=4
        ),  # fmt: skip
        forward_kwargs=forward_kwargs,
        to_latents=to_latents,
        set_steps=set_steps,
        flow_matching=True,
        guided=False,
        sizes=FLUX_SIZES,
        bench_size="bench",
        bench_case=_bench_case,
        pipeline_class="FluxPipeline",
        tiny_pipeline=tiny_flux_pipeline,
        latent_shape=latent_shape,
        encode_captions=encode_captions,
    )
)

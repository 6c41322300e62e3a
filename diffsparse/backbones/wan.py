"""Wan2.1: a flow-matching text-to-video transformer, `WanTransformer3DModel` in `WanPipeline` (UMT5 captions).

Rotary self-attention, cross-attention and MLP units on a (frames, rows, cols) token grid; the loop passes latents
`(B, C, F, H, W)` as they are with train timesteps.

`tiny` sizes are for tests, `bench` is wide enough for wall-clock benchmarks on a CPU, and `1.3B` records the
released architecture (Wan2.1-T2V-1.3B) for reference: it is never built in tests.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from diffsparse.backbones.registry import (
    CROSS_ATTN,
    MLP,
    ROPE_SELF,
    SELF_ATTN,
    BackboneSpec,
    BlockList,
    UnitSpec,
    patch_grid,
    register_backbone,
)
from diffsparse.backbones.tiny_parts import sized, word_tokenizer

# name -> WanTransformer3DModel arguments; the rope splits each head into t / h / w parts of
# head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6) and 2 * (head_dim // 6) channels.
WAN_SIZES: dict[str, dict] = {
    "tiny": dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ),
    "bench": dict(
        patch_size=(1, 2, 2),
        num_attention_heads=8,
        attention_head_dim=64,
        in_channels=16,
        out_channels=16,
        text_dim=256,
        freq_dim=256,
        ffn_dim=2048,
        num_layers=8,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,
    ),
    "1.3B": dict(
        patch_size=(1, 2, 2),
        num_attention_heads=12,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=8960,
        num_layers=30,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,
    ),
}


def build_wan(size: str = "tiny", seed: int = 0, **overrides) -> WanTransformer3DModel:
    """A randomly initialised `WanTransformer3DModel` of the named size, in eval mode.

    Args:
        size: a key of `WAN_SIZES`.
        seed: torch seed for the random weights.
        **overrides: constructor arguments replacing those of the size.

    Example:
        >>> model = build_wan("tiny")
        >>> model(**wan_example_inputs(model)).sample.shape
        torch.Size([2, 4, 2, 8, 8])
    """
    kwargs = sized(WAN_SIZES, size, "Wan", overrides)
    torch.manual_seed(seed)
    return WanTransformer3DModel(**kwargs).eval()


def wan_example_inputs(
    model, batch: int = 2, frames: int = 2, height: int = 8, width: int = 8, text_tokens: int = 8, seed: int = 0
) -> dict:
    """Forward keyword arguments for one step of a Wan transformer on latents of `frames` x `height` x `width`."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, frames, height, width, generator=g),
        timestep=torch.full((batch,), 500, dtype=torch.long),
        encoder_hidden_states=torch.randn(batch, text_tokens, cfg.text_dim, generator=g),
    )


def tiny_wan_pipeline(seed: int = 0) -> WanPipeline:
    """A stock `WanPipeline` from tiny random components, built offline.

    The VAE compresses 4x in time and 4x in space (Wan's own is 4x and 8x), so `num_frames - 1` must be a multiple
    of 4 and `height`, `width` multiples of 8 (VAE times patch). Prompts are made of `TINY_VOCABULARY`.

    Example:
        >>> pipe = tiny_wan_pipeline()
        >>> out = pipe("a photo of a cat", height=16, width=16, num_frames=5, num_inference_steps=3,
        ...            max_sequence_length=8, output_type="pt")
        >>> out.frames.shape
        torch.Size([1, 5, 3, 16, 16])
    """
    transformer = build_wan("tiny", seed=seed)
    cfg = transformer.config
    z_dim = cfg.in_channels
    torch.manual_seed(seed)
    # Two temporal downsamplings: the VAE's encoder reads frames in chunks of 4 whatever its config says.
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
        scale_factor_temporal=4,
        scale_factor_spatial=4,
    ).eval()
    tokenizer = word_tokenizer()
    config = UMT5Config(
        vocab_size=len(tokenizer), d_model=cfg.text_dim, d_kv=8, d_ff=2 * cfg.text_dim, num_layers=1, num_heads=2
    )
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(config).eval()
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )


def _call_default(pipe, name: str):
    """A keyword's default in the pipeline's `__call__` (e.g. `height=480`), or None."""
    parameter = inspect.signature(type(pipe).__call__).parameters.get(name)
    return None if parameter is None else parameter.default


def latent_shape(pipe, height=None, width=None, frames=None) -> tuple[int, ...]:
    """Wan compresses time and space: its call's defaults are 81 frames of 480 x 832."""
    spatial, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
    height = height or _call_default(pipe, "height")
    width = width or _call_default(pipe, "width")
    frames = frames or _call_default(pipe, "num_frames")
    if (frames - 1) % temporal:
        raise ValueError(f"Wan frames - 1 must be a multiple of {temporal}, got frames={frames}.")
    return (pipe.transformer.config.in_channels, (frames - 1) // temporal + 1, height // spatial, width // spatial)


def encode_captions(pipe, chunk: list[str], max_sequence_length: int) -> dict:
    embeds, _ = pipe.encode_prompt(chunk, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
    return {"prompt_embeds": embeds}


def _bench_case(size: str, side: int, batch: int, frames: int):
    """`batch` is CFG pairs of `frames` latent frames with `side` x `side` tokens each, and 64 text tokens."""
    model = build_wan(size)
    inputs = wan_example_inputs(model, batch=batch, frames=frames, height=2 * side, width=2 * side, text_tokens=64)
    return model, inputs["hidden_states"][: batch // 2], {"encoder_hidden_states": inputs["encoder_hidden_states"]}


WAN = register_backbone(
    BackboneSpec(
        name="wan",
        model_classes=("WanTransformer3DModel",),
        block_lists=(
            BlockList(
                "blocks",
                (UnitSpec("attn1", SELF_ATTN, ROPE_SELF), UnitSpec("attn2", CROSS_ATTN), UnitSpec("ffn", MLP)),
            ),
        ),
        token_grid=patch_grid,
        build=build_wan,
        example_inputs=wan_example_inputs,
        text_conditioned=True,
        # Wan2.1: a selector without attention maps, so attention stays fused (the paper follows DuCa with value
        # norms; ours is the input norm), with the reuse term and a 2 x 2 spatial bonus in every frame.
        selector_defaults=dict(name="norm", reuse_weight=0.25 / 3, bonus=0.4, bonus_kernel=2),
        flow_matching=True,
        video=True,
        sizes=WAN_SIZES,
        bench_size="bench",
        bench_case=_bench_case,
        pipeline_class="WanPipeline",
        tiny_pipeline=tiny_wan_pipeline,
        latent_shape=latent_shape,
        encode_captions=encode_captions,
    )
)

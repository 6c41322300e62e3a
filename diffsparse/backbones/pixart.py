"""PixArt-alpha: a text-to-image transformer, `PixArtTransformer2DModel` in `PixArtAlphaPipeline` (T5 captions).

Self-attention, cross-attention and MLP units on a patch-2 token grid; the loop passes latents `(B, C, H, W)` as
they are with train timesteps (and empty resolution conditions) and keeps the output's first C channels.
"""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

from diffsparse.backbones.basic_block import fresh_mlp_basic_block, reused_basic_block
from diffsparse.backbones.registry import (
    CROSS_ATTN,
    MLP,
    SELF_ATTN,
    BackboneSpec,
    BlockList,
    UnitSpec,
    image_latent_shape,
    patch_grid,
    plain_forward_kwargs,
    register_backbone,
)
from diffsparse.backbones.tiny_parts import SIZES, patch2_config, tiny_text_encoder, tiny_vae

NO_RESOLUTION = {"resolution": None, "aspect_ratio": None}  # `added_cond_kwargs` of a model without them


def build_pixart(
    size: str = "tiny", sample_size: int = 8, in_channels: int = 4, caption_channels: int = 32, seed: int = 0
) -> PixArtTransformer2DModel:
    """A randomly initialised `PixArtTransformer2DModel` of the named size, in eval mode.

    Args:
        size: a key of `SIZES`.
        sample_size: latent height = width; tokens = (sample_size / 2) ** 2.
        in_channels: latent channels.
        caption_channels: text-embedding width.
        seed: torch seed for the random weights.
    """
    common = patch2_config(size, sample_size, in_channels)
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        out_channels=2 * in_channels,
        cross_attention_dim=common["num_attention_heads"] * common["attention_head_dim"],
        caption_channels=caption_channels,
        use_additional_conditions=False,
        **common,
    ).eval()


def pixart_example_inputs(model: torch.nn.Module, batch: int = 2, text_tokens: int = 8, seed: int = 0) -> dict:
    """Forward keyword arguments for one denoising step (random latents of the model's sample size and text)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.full((batch,), 500, dtype=torch.long)
    text = torch.randn(batch, text_tokens, cfg.caption_channels, generator=g)
    return dict(
        hidden_states=x,
        timestep=t,
        encoder_hidden_states=text,
        encoder_attention_mask=torch.ones(batch, text_tokens),
        added_cond_kwargs=dict(NO_RESOLUTION),
    )


def tiny_pixart_pipeline(seed: int = 0, **transformer_kwargs) -> PixArtAlphaPipeline:
    """A stock `PixArtAlphaPipeline` from tiny random components (`build_pixart(**transformer_kwargs)`), offline.

    Its text encoder is `tiny_text_encoder` (call it with prompts of `TINY_VOCABULARY`, and a
    `max_sequence_length` of a few tokens), or call it with `prompt_embeds` and the other embedding arguments.
    """
    transformer = build_pixart(seed=seed, **transformer_kwargs)
    vae = tiny_vae(transformer.config.in_channels, seed=seed)
    tokenizer, text_encoder = tiny_text_encoder(transformer.config.caption_channels, seed=seed)
    return PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def forward_kwargs(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, conditions: dict) -> dict:
    kwargs = plain_forward_kwargs(model, x, t, conditions)
    kwargs.setdefault("added_cond_kwargs", dict(NO_RESOLUTION))
    return kwargs


def encode_captions(pipe, chunk: list[str], max_sequence_length: int) -> dict:
    embeds, mask, _, _ = pipe.encode_prompt(
        chunk, do_classifier_free_guidance=False, clean_caption=False, max_sequence_length=max_sequence_length
    )
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask}


def _bench_case(size: str, side: int, batch: int, frames: int):
    """`batch` is CFG pairs: random text for both halves."""
    model = build_pixart(size, sample_size=2 * side)
    inputs = pixart_example_inputs(model, batch=batch)
    conditions = {k: inputs[k] for k in ("encoder_hidden_states", "encoder_attention_mask")}
    return model, inputs["hidden_states"][: batch // 2], conditions


PIXART = register_backbone(
    BackboneSpec(
        name="pixart",
        model_classes=("PixArtTransformer2DModel",),
        block_lists=(
            BlockList(
                "transformer_blocks",
                (UnitSpec("attn1", SELF_ATTN), UnitSpec("attn2", CROSS_ATTN), UnitSpec("ff", MLP)),
                reused_basic_block,
                fresh_mlp_basic_block,
            ),
        ),
        token_grid=patch_grid,
        build=build_pixart,
        example_inputs=pixart_example_inputs,
        text_conditioned=True,
        # PixArt-alpha: lambda_1 = 0, lambda_2 = 1, lambda_3 = 0.25/3, lambda_4 = 0.4, k = 4 (DiffSparse A.5.1).
        selector_defaults=dict(
            name="toca",
            self_attn_weight=0.0,
            cross_attn_weight=1.0,
            reuse_weight=0.25 / 3,
            bonus=0.4,
            bonus_kernel=4,
        ),  # fmt: skip
        forward_kwargs=forward_kwargs,
        prunable=True,
        sizes=SIZES,
        bench_size="XL/2",
        bench_case=_bench_case,
        pipeline_class="PixArtAlphaPipeline",
        tiny_pipeline=tiny_pixart_pipeline,
        latent_shape=image_latent_shape,
        encode_captions=encode_captions,
    )
)

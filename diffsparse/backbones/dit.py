"""DiT (Peebles & Xie): a class-conditional image transformer, `DiTTransformer2DModel` in `DiTPipeline`.

Self-attention and MLP units on a patch-2 token grid; the loop passes latents `(B, C, H, W)` as they are with train
timesteps and keeps the output's first C channels (a learned-variance half is dropped).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from diffsparse.backbones.basic_block import fresh_mlp_basic_block, reused_basic_block
from diffsparse.backbones.registry import (
    MLP,
    SELF_ATTN,
    BackboneSpec,
    BlockList,
    UnitSpec,
    image_latent_shape,
    patch_grid,
    register_backbone,
)
from diffsparse.backbones.tiny_parts import SIZES, patch2_config, tiny_vae


def build_dit(
    size: str = "tiny", sample_size: int = 8, in_channels: int = 4, num_classes: int = 1000, seed: int = 0
) -> DiTTransformer2DModel:
    """A randomly initialised `DiTTransformer2DModel` of the named size, in eval mode.

    Args:
        size: a key of `SIZES`.
        sample_size: latent height = width; tokens = (sample_size / 2) ** 2.
        in_channels: latent channels.
        num_classes: class-embedding entries (the null class for CFG is added by diffusers).
        seed: torch seed for the random weights.
    """
    common = patch2_config(size, sample_size, in_channels)
    torch.manual_seed(seed)
    return DiTTransformer2DModel(out_channels=2 * in_channels, num_embeds_ada_norm=num_classes, **common).eval()


def dit_example_inputs(model: torch.nn.Module, batch: int = 2, seed: int = 0) -> dict:
    """Forward keyword arguments for one denoising step (random latents of the model's sample size and classes)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.full((batch,), 500, dtype=torch.long)
    labels = torch.randint(0, cfg.num_embeds_ada_norm, (batch,), generator=g)
    return dict(hidden_states=x, timestep=t, class_labels=labels)


def tiny_dit_pipeline(seed: int = 0, **transformer_kwargs) -> DiTPipeline:
    """A stock `DiTPipeline` from tiny random components (`build_dit(**transformer_kwargs)`), built offline."""
    transformer = build_dit(seed=seed, **transformer_kwargs)
    vae = tiny_vae(transformer.config.in_channels, seed=seed)
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())


def _bench_case(size: str, side: int, batch: int, frames: int):
    """`batch` is CFG pairs: conditional classes, then the null class."""
    model = build_dit(size, sample_size=2 * side)
    inputs = dit_example_inputs(model, batch=batch)
    labels = inputs["class_labels"]
    labels[batch // 2 :] = model.config.num_embeds_ada_norm
    return model, inputs["hidden_states"][: batch // 2], {"class_labels": labels}


DIT = register_backbone(
    BackboneSpec(
        name="dit",
        model_classes=("DiTTransformer2DModel",),
        block_lists=(
            BlockList(
                "transformer_blocks",
                (UnitSpec("attn1", SELF_ATTN), UnitSpec("ff", MLP)),
                reused_basic_block,
                fresh_mlp_basic_block,
            ),
        ),
        token_grid=patch_grid,
        build=build_dit,
        example_inputs=dit_example_inputs,
        text_conditioned=False,
        # DiT: lambda_1 = 1, lambda_2 = 0, lambda_3 = 0.25/3, lambda_4 = 0.6, k = 2 (DiffSparse A.5.1, from ToCa).
        selector_defaults=dict(
            name="toca",
            self_attn_weight=1.0,
            cross_attn_weight=0.0,
            reuse_weight=0.25 / 3,
            bonus=0.6,
            bonus_kernel=2,
        ),  # fmt: skip
        prunable=True,
        sizes=SIZES,
        bench_size="XL/2",
        bench_case=_bench_case,
        pipeline_class="DiTPipeline",
        tiny_pipeline=tiny_dit_pipeline,
        latent_shape=image_latent_shape,
    )
)

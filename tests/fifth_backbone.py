"""A fifth backbone in one file: a user's own DiT variant (a subclass of diffusers' DiT) with its own registry row.

Nothing else of diffsparse changes to support it: the row says which modules are units, how the token grid is laid
out, which selector ranks its tokens, how to build a tiny random one and its stock pipeline, and its example
inputs; how a sampling loop calls it is the plain call (latents as they are, train timesteps).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from diffsparse.backbones import BackboneSpec, BlockList, UnitSpec, register_backbone
from diffsparse.backbones.registry import MLP, SELF_ATTN, image_latent_shape, patch_grid
from diffsparse.backbones.tiny_parts import sized, tiny_vae


class FifthDiT(DiTTransformer2DModel):
    """A class-conditional DiT of the user's own (here: diffusers' DiT as it is, under its own class name)."""


SIZES = {
    "tiny": dict(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        norm_num_groups=4,
        num_embeds_ada_norm=1000,  # the stock DiTPipeline guides with class 1000
    )
}


def build_fifth(size: str = "tiny", seed: int = 0, **overrides) -> FifthDiT:
    kwargs = sized(SIZES, size, "fifth", overrides)
    torch.manual_seed(seed)
    return FifthDiT(**kwargs).eval()


def fifth_example_inputs(model: FifthDiT, batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g),
        timestep=torch.full((batch,), 500, dtype=torch.long),
        class_labels=torch.randint(0, cfg.num_embeds_ada_norm, (batch,), generator=g),
    )


def tiny_fifth_pipeline(seed: int = 0) -> DiTPipeline:
    transformer = build_fifth(seed=seed)
    vae = tiny_vae(transformer.config.in_channels, seed=seed)
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())


FIFTH = register_backbone(
    BackboneSpec(
        name="fifth",
        model_classes=("FifthDiT",),
        block_lists=(BlockList("transformer_blocks", (UnitSpec("attn1", SELF_ATTN), UnitSpec("ff", MLP))),),
        token_grid=patch_grid,
        build=build_fifth,
        example_inputs=fifth_example_inputs,
        text_conditioned=False,
        # Its own default selector (norm), and ToCa's weights for when `selector="toca"` is asked for.
        selector_defaults=dict(
            name="norm", self_attn_weight=1.0, cross_attn_weight=0.0, reuse_weight=0.1, bonus=0.5, bonus_kernel=2
        ),
        sizes=SIZES,
        tiny_pipeline=tiny_fifth_pipeline,
        latent_shape=image_latent_shape,
    )
)

"""FLUX and Wan2.1 transformers of named sizes with random weights, and tiny stock pipelines built offline.

`tiny` sizes are for tests, `bench` sizes are wide enough for wall-clock benchmarks on a CPU, and `schnell` / `1.3B`
record the released architectures (FLUX.1-schnell, Wan2.1-T2V-1.3B) for reference: they are never built in tests.
Real checkpoints load with the diffusers `from_pretrained` of each class.
"""

from __future__ import annotations

import torch

from diffsparse.backbones.tiny import TINY_VOCABULARY, tiny_text_encoder

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


def _sized(sizes: dict[str, dict], size: str, kind: str, overrides: dict) -> dict:
    if size not in sizes:
        raise ValueError(f"Unknown {kind} size {size!r}; choose one of {list(sizes)}.")
    return {**sizes[size], **overrides}


def build_flux(size: str = "tiny", seed: int = 0, **overrides):
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
    from diffusers import FluxTransformer2DModel

    kwargs = _sized(FLUX_SIZES, size, "FLUX", overrides)
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**kwargs).eval()


def build_wan(size: str = "tiny", seed: int = 0, **overrides):
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
    from diffusers import WanTransformer3DModel

    kwargs = _sized(WAN_SIZES, size, "Wan", overrides)
    torch.manual_seed(seed)
    return WanTransformer3DModel(**kwargs).eval()


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


def _word_tokenizer(bos: str | None = None, max_length: int | None = None):
    """A word-level fast tokenizer over `TINY_VOCABULARY` (pad 0, end-of-sequence 1), optionally with a `bos` word."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = (*TINY_VOCABULARY, bos) if bos else TINY_VOCABULARY
    vocab = {word: i for i, word in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template, special = ("$A </s>", [("</s>", vocab["</s>"])])
    if bos:
        template, special = f"{bos} {template}", [(bos, vocab[bos]), *special]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=special)
    special_tokens = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token=bos)
    if max_length is not None:
        special_tokens["model_max_length"] = max_length
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special_tokens)


def _tiny_clip(width: int, max_length: int = 16, seed: int = 0):
    """A random one-layer CLIP text encoder of `width` and its word-level tokenizer (FLUX's pooled prompt)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _word_tokenizer(bos="<s>", max_length=max_length)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=width,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # CLIP pools the hidden state at the first end-of-sequence token
    )
    torch.manual_seed(seed)
    return tokenizer, CLIPTextModel(config).eval()


def tiny_flux_pipeline(seed: int = 0):
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
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

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
    tokenizer, text_encoder = _tiny_clip(cfg.pooled_projection_dim, seed=seed)
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


def tiny_wan_pipeline(seed: int = 0):
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
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

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
    tokenizer = _word_tokenizer()
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

"""Model variants by name (random weights: for speed, tests and shape checks), and tiny stock pipelines.

Sizes follow DiT's own table (DiT-S/B/L/XL with patch 2) and PixArt-alpha's XL-2; `tiny` is 2 layers and 2 heads
for tests. Real checkpoints load with the diffusers `from_pretrained` of each class.
"""

from __future__ import annotations

import torch

# name -> (layers, heads, head_dim); patch size 2 for all.
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 2, 8),
    "S/2": (12, 6, 64),
    "B/2": (12, 12, 64),
    "L/2": (24, 16, 64),
    "XL/2": (28, 16, 72),
}
BACKBONE_NAMES = ("dit", "pixart")


def build_transformer(
    backbone: str = "dit",
    size: str = "tiny",
    sample_size: int = 8,
    in_channels: int = 4,
    caption_channels: int = 32,
    num_classes: int = 1000,
    seed: int = 0,
) -> torch.nn.Module:
    """A randomly initialised diffusers transformer of the named size, in eval mode.

    Args:
        backbone: `dit` (DiTTransformer2DModel) or `pixart` (PixArtTransformer2DModel).
        size: a key of `SIZES`.
        sample_size: latent height = width; tokens = (sample_size / 2) ** 2.
        in_channels: latent channels.
        caption_channels: text-embedding width (PixArt).
        num_classes: class-embedding entries (DiT; the null class for CFG is added by diffusers).
        seed: torch seed for the random weights.
    """
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; choose one of {sorted(SIZES)}.")
    layers, heads, head_dim = SIZES[size]
    common = dict(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        num_layers=layers,
        sample_size=sample_size,
        patch_size=2,
        norm_num_groups=min(32, in_channels),
    )
    torch.manual_seed(seed)
    if backbone == "dit":
        model = DiTTransformer2DModel(out_channels=2 * in_channels, num_embeds_ada_norm=num_classes, **common)
    elif backbone == "pixart":
        model = PixArtTransformer2DModel(
            out_channels=2 * in_channels,
            cross_attention_dim=heads * head_dim,
            caption_channels=caption_channels,
            use_additional_conditions=False,
            **common,
        )
    else:
        raise ValueError(f"Unknown backbone {backbone!r}; choose one of {BACKBONE_NAMES}.")
    return model.eval()


def tiny_vae(latent_channels: int = 4, seed: int = 0):
    """A two-level random `AutoencoderKL` (8 px per latent pixel would need 4 levels; 2x is enough for tests)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        latent_channels=latent_channels,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    ).eval()


# The tiny text encoder's whole vocabulary (a word-level tokenizer: prompts made of other words get `<unk>`).
TINY_VOCABULARY = ("<pad>", "</s>", "<unk>", *"a an the of photo drawing digit zero one two three four five six "
                   "seven eight nine red green blue black white cat dog small large".split())  # fmt: skip


def tiny_text_encoder(width: int = 32, seed: int = 0):
    """A random one-layer T5 encoder of `width` and a word-level tokenizer over `TINY_VOCABULARY`, built offline.

    Shaped like PixArt-alpha's T5 (pad 0, end-of-sequence 1), so a stock pipeline encodes prompts with it.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {word: i for i, word in enumerate(TINY_VOCABULARY)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(vocab), d_model=width, d_kv=8, d_ff=2 * width, num_layers=1, num_heads=2)
    return tokenizer, T5EncoderModel(config).eval()


def tiny_pipeline(backbone: str = "dit", seed: int = 0, **transformer_kwargs):
    """A stock `DiTPipeline` or `PixArtAlphaPipeline` from tiny random components, built offline.

    The PixArt pipeline's text encoder is `tiny_text_encoder` (call it with prompts of `TINY_VOCABULARY`, and a
    `max_sequence_length` of a few tokens), or call it with `prompt_embeds` and the other embedding arguments.
    """
    from diffusers import DDIMScheduler, DiTPipeline, DPMSolverMultistepScheduler, PixArtAlphaPipeline

    transformer = build_transformer(backbone, seed=seed, **transformer_kwargs)
    vae = tiny_vae(transformer.config.in_channels, seed=seed)
    if backbone == "dit":
        return DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    tokenizer, text_encoder = tiny_text_encoder(transformer.config.caption_channels, seed=seed)
    return PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def example_inputs(model: torch.nn.Module, batch: int = 2, text_tokens: int = 8, seed: int = 0) -> dict:
    """Forward keyword arguments for one denoising step of `model` (random latents, classes or text)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.full((batch,), 500, dtype=torch.long)
    if type(model).__name__ == "DiTTransformer2DModel":
        labels = torch.randint(0, cfg.num_embeds_ada_norm, (batch,), generator=g)
        return dict(hidden_states=x, timestep=t, class_labels=labels)
    text = torch.randn(batch, text_tokens, cfg.caption_channels, generator=g)
    return dict(
        hidden_states=x,
        timestep=t,
        encoder_hidden_states=text,
        encoder_attention_mask=torch.ones(batch, text_tokens),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )

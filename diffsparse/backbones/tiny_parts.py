"""Pieces the backbones' tiny random builders share: the DiT size table, a tiny VAE, tiny text encoders (T5, CLIP)
and their word-level tokenizer, all built offline.

Sizes follow DiT's own table (DiT-S/B/L/XL with patch 2; PixArt-alpha's XL-2 is DiT's); `tiny` is 2 layers and
2 heads for tests. Real checkpoints load with the diffusers `from_pretrained` of each class.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

# name -> (layers, heads, head_dim) of the patch-2 image transformers (DiT, PixArt-alpha).
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 2, 8),
    "S/2": (12, 6, 64),
    "B/2": (12, 12, 64),
    "L/2": (24, 16, 64),
    "XL/2": (28, 16, 72),
}

# The tiny text encoders' whole vocabulary (a word-level tokenizer: prompts made of other words get `<unk>`).
TINY_VOCABULARY = ("<pad>", "</s>", "<unk>", *"a an the of photo drawing digit zero one two three four five six "
                   "seven eight nine red green blue black white cat dog small large".split())  # fmt: skip


def patch2_config(size: str, sample_size: int, in_channels: int) -> dict:
    """Constructor arguments shared by DiT and PixArt-alpha for a size of `SIZES` (patch 2)."""
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; choose one of {sorted(SIZES)}.")
    layers, heads, head_dim = SIZES[size]
    return dict(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        num_layers=layers,
        sample_size=sample_size,
        patch_size=2,
        norm_num_groups=min(32, in_channels),
    )


def sized(sizes: dict[str, dict], size: str, kind: str, overrides: dict) -> dict:
    """The constructor arguments of a named size, with `overrides` replacing some."""
    if size not in sizes:
        raise ValueError(f"Unknown {kind} size {size!r}; choose one of {list(sizes)}.")
    return {**sizes[size], **overrides}


def tiny_vae(latent_channels: int = 4, seed: int = 0) -> AutoencoderKL:
    """A two-level random `AutoencoderKL` (8 px per latent pixel would need 4 levels; 2x is enough for tests)."""
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


def word_tokenizer(bos: str | None = None, max_length: int | None = None) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over `TINY_VOCABULARY` (pad 0, end-of-sequence 1), optionally with a `bos` word."""
    words = (*TINY_VOCABULARY, bos) if bos else TINY_VOCABULARY
    vocab = {word: i for i, word in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template, special = ("$A </s>", [("</s>", vocab["</s>"])])
    if bos:
        template, special = f"{bos} {template}", [(bos, vocab[bos]), *special]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=special)
    special_tokens = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    if bos:
        special_tokens["bos_token"] = bos
    if max_length is not None:
        special_tokens["model_max_length"] = max_length
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special_tokens)


def tiny_text_encoder(width: int = 32, seed: int = 0) -> tuple[PreTrainedTokenizerFast, T5EncoderModel]:
    """A random one-layer T5 encoder of `width` and a word-level tokenizer over `TINY_VOCABULARY`, built offline.

    Shaped like PixArt-alpha's T5 (pad 0, end-of-sequence 1), so a stock pipeline encodes prompts with it.
    """
    tokenizer = word_tokenizer()
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=1, num_heads=2)
    return tokenizer, T5EncoderModel(config).eval()


def tiny_clip(width: int, max_length: int = 16, seed: int = 0) -> tuple[PreTrainedTokenizerFast, CLIPTextModel]:
    """A random one-layer CLIP text encoder of `width` and its word-level tokenizer (FLUX's pooled prompt)."""
    tokenizer = word_tokenizer(bos="<s>", max_length=max_length)
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

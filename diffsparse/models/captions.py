"""Captions as conditions: their text embeddings, computed once with a pipeline's own text encoder and stored.

Learning a schedule for a text-to-image model (PixArt-alpha) runs hundreds of rollouts over the same captions, so
their embeddings are precomputed into one safetensors file:

    python -m diffsparse.captions PIPELINE_DIR captions.txt captions.safetensors

The file holds `prompt_embeds` (N, L, D) and the empty prompt's embedding `negative_prompt_embeds` (1, L, D), the
unconditional half of classifier-free guidance; PixArt-alpha's also the attention masks (`prompt_attention_mask`,
`negative_prompt_attention_mask`), FLUX's the pooled CLIP embeddings (`pooled_prompt_embeds`,
`negative_pooled_prompt_embeds`). The captions themselves are in its metadata. With `--classes` (lines
"CLASS<tab>caption"), it also holds each caption's class id (`labels`), so an evaluation measures class accuracy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffsparse.backbones import BACKBONES, find_backbone
from diffsparse.files import atomic_path
from diffsparse.models.loading import load_pipeline, pipeline_backbone

KEYS = ("prompt_embeds", "negative_prompt_embeds")  # in every file
CAPTION_LABELS = "labels"  # optional: each caption's class id (N,)
# The transformer's keyword each stored tensor goes to (PixArt-alpha, FLUX and Wan2.1 forwards), when present.
FORWARD_KEYS = {
    "prompt_embeds": "encoder_hidden_states",
    "prompt_attention_mask": "encoder_attention_mask",
    "pooled_prompt_embeds": "pooled_projections",
}


@torch.no_grad()
def encode_captions(pipe, captions: list[str], max_sequence_length: int = 120, batch_size: int = 32) -> dict:
    """Embeddings of `captions` and of the empty prompt, through the pipeline's own `encode_prompt` (the
    `encode_captions` of its transformer's registry row: PixArt-alpha, FLUX or Wan2.1)."""
    if not captions:
        raise ValueError("No captions to encode.")
    if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
        raise ValueError(f"{type(pipe).__name__} has no text encoder or tokenizer to encode captions with.")
    encode = _caption_encoder(pipe)
    parts = [
        encode(pipe, captions[start : start + batch_size], max_sequence_length)
        for start in range(0, len(captions), batch_size)
    ]
    empty = encode(pipe, [""], max_sequence_length)
    out = {k: torch.cat([p[k] for p in parts]).contiguous() for k in parts[0]}
    out |= {f"negative_{k}": v[:1].contiguous() for k, v in empty.items()}
    return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}


def _caption_encoder(pipe):
    """The caption encoder of the pipeline's backbone; a clear error for a pipeline no row describes."""
    transformer = getattr(pipe, "transformer", None)
    spec = None if transformer is None else find_backbone(transformer)
    if spec is not None and spec.encode_captions is not None:
        return spec.encode_captions
    if spec is not None:
        why = f"its transformer is a {spec.name} model, which is class-conditional"
    else:
        why = f"its transformer ({type(transformer).__name__}) is not a registered backbone"
    known = sorted(s.pipeline_class for s in BACKBONES.values() if s.encode_captions and s.pipeline_class)
    raise ValueError(
        f"Cannot encode captions with a {type(pipe).__name__}: {why}. Pipelines with a caption encoder: {known} "
        "(a new backbone adds one in its registry row, `encode_captions`)."
    )


def forward_conditions(tensors: dict, prefix: str = "") -> dict:
    """The transformer keywords of the stored tensors (`prefix="negative_"`: the empty prompt's)."""
    return {kw: tensors[prefix + key] for key, kw in FORWARD_KEYS.items() if prefix + key in tensors}


def save_captions(path: str | Path, tensors: dict, captions: list[str]) -> Path:
    """Write the embeddings and the captions to `path` (whole or not at all)."""
    missing = [k for k in KEYS if k not in tensors]
    if missing:
        raise ValueError(f"Caption embeddings lack {missing}.")
    if len(captions) != len(tensors["prompt_embeds"]):
        raise ValueError(f"{len(captions)} captions for {len(tensors['prompt_embeds'])} embeddings.")
    labels = tensors.get(CAPTION_LABELS)
    if labels is not None and (labels.shape != (len(captions),) or labels.is_floating_point() or labels.min() < 0):
        raise ValueError(f"Caption labels must be {len(captions)} class ids >= 0, one per caption.")
    known = set(FORWARD_KEYS) | {f"negative_{k}" for k in FORWARD_KEYS} | {CAPTION_LABELS}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v for k, v in tensors.items() if k in known}, tmp, metadata={"captions": json.dumps(captions)})
    return path


def load_captions(path: str | Path) -> tuple[dict, list[str]]:
    """(embeddings, captions) from a file written by `save_captions`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No caption embeddings at {path}. Make them with `python -m diffsparse.captions PIPELINE_DIR "
            "captions.txt OUT.safetensors` (one caption per line)."
        )
    tensors = load_file(path)
    missing = [k for k in KEYS if k not in tensors]
    if missing:
        raise ValueError(f"{path} lacks {missing}: write it with diffsparse.captions.save_captions.")
    with safe_open(path, "pt") as f:
        captions = json.loads((f.metadata() or {}).get("captions", "[]"))
    return tensors, captions


def null_conditions(tensors: dict) -> dict:
    """The unconditional half's transformer keywords (the empty prompt), batch 1."""
    return forward_conditions(tensors, "negative_")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m diffsparse.captions",
        description="Encode captions (one per line) with a saved text-to-image pipeline's text encoder and store "
        "the embeddings, with the empty prompt's, for learning schedules (`data.captions=OUT`).",
    )
    parser.add_argument(
        "pipeline", help="folder of a saved PixArt-alpha, FLUX or Wan2.1 pipeline (with model_index.json)"
    )
    parser.add_argument("captions", help="text file, one caption per line (blank lines are skipped)")
    parser.add_argument("out", help="safetensors file to write")
    parser.add_argument("--max-length", type=int, default=120, help="text tokens per caption (PixArt-alpha: 120)")
    parser.add_argument("--classes", action="store_true",
                        help="each line is 'CLASS<tab>caption' (CLASS: an id >= 0); the file keeps the ids, so an "
                        "evaluation measures class accuracy")  # fmt: skip
    args = parser.parse_args(argv)
    text = Path(args.captions)
    if not text.is_file():
        parser.error(f"no captions file at {text}")
    captions = [line.strip() for line in text.read_text().splitlines() if line.strip()]
    if not captions:
        parser.error(f"{text} holds no captions")
    labels = None
    if args.classes:
        rows = [line.split("\t", 1) for line in captions]
        if any(len(r) != 2 or not r[0].strip().isdigit() or not r[1].strip() for r in rows):
            parser.error(f"--classes: every line of {text} must be 'CLASS<tab>caption' with CLASS an id >= 0")
        labels = torch.tensor([int(r[0]) for r in rows])
        captions = [r[1].strip() for r in rows]
    pipe = load_pipeline(args.pipeline, backbone=pipeline_backbone(Path(args.pipeline)))
    tensors = encode_captions(pipe, captions, args.max_length)
    if labels is not None:
        tensors[CAPTION_LABELS] = labels
    out = save_captions(args.out, tensors, captions)
    print(f"{len(captions)} captions -> {out}")


if __name__ == "__main__":
    main()

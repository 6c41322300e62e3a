"""Attention with the per-token signals the attention-based selectors need (self-attention influence, entropy).

Used only on steps where a unit computes all of its tokens *and* a later step of the same block will select
tokens; everywhere else the module's own processor runs (fused SDPA), so this costs nothing there.
"""

from __future__ import annotations

import math

import torch

_STANDARD_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")
_CHUNK_ELEMENTS = 1 << 21  # bound the (B, heads, queries, keys) probability block to 8 MiB in fp32


def check_standard_attention(
    attn: torch.nn.Module, name: str, feature: str = "the attention-map selector (toca)"
) -> None:
    """Raise unless `attn` is a diffusers `Attention` running a plain (softmax, no extra norms) processor."""
    proc = type(getattr(attn, "processor", None)).__name__
    plain = (
        proc in _STANDARD_PROCESSORS
        and getattr(attn, "spatial_norm", None) is None
        and getattr(attn, "group_norm", None) is None
        and getattr(attn, "norm_cross", None) is None
        and not getattr(attn, "residual_connection", False)
        and getattr(attn, "rescale_output_factor", 1.0) == 1.0
    )
    if not plain:
        raise ValueError(
            f"Unit {name} uses attention processor {proc} with extra features; {feature} supports the standard "
            "processors only."
            + (" Use selector='norm' or 'similarity', which need no attention map." if "toca" in feature else "")
        )


def attention_with_signals(
    attn: torch.nn.Module,
    hidden_states: torch.Tensor,
    context: torch.Tensor,
    attention_mask: torch.Tensor | None,
    want: str,
    kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `attn` on all query tokens and also return one score per query-side token.

    Args:
        attn: a diffusers `Attention` module (checked with `check_standard_attention`).
        hidden_states: `(B, N, D)` queries.
        context: `(B, M, D)` keys/values (`hidden_states` itself for self-attention).
        attention_mask: as the block passes it to `attn` (or None).
        want: `"influence"`: for self-attention, how much attention each token receives, summed over queries and
            averaged over heads (mean 1 over tokens); `"entropy"`: entropy of each query's attention over the
            context, divided by log(M) so it lies in [0, 1].
        kv: the context's key and value projections, if the caller has them (`cache.kv`); else projected here.

    Returns:
        `(output (B, N, D_out), signal (B, N))`, the output equal to the module's own up to float rounding.
    """
    b, n, _ = hidden_states.shape
    m = context.shape[1]
    h = attn.heads
    q = attn.to_q(hidden_states)
    k, v = (attn.to_k(context), attn.to_v(context)) if kv is None else kv
    d = q.shape[-1] // h
    q, k, v = (x.view(b, -1, h, d).transpose(1, 2) for x in (q, k, v))
    if getattr(attn, "norm_q", None) is not None:
        q = attn.norm_q(q)
    if getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    bias = None
    if attention_mask is not None:
        bias = attn.prepare_attention_mask(attention_mask, m, b).view(b, h, -1, m)

    chunk = max(1, _CHUNK_ELEMENTS // max(1, b * h * m))
    outs, signal_parts = [], []
    influence = torch.zeros(b, m, dtype=torch.float32, device=q.device) if want == "influence" else None
    k_t = k.transpose(-1, -2)
    for start in range(0, n, chunk):
        # One buffer per chunk, softmax in place: fewer and smaller temporaries than `softmax(q k^T) v`.
        probs = q[:, :, start : start + chunk] @ k_t
        probs.mul_(attn.scale)
        if bias is not None:
            probs.add_(bias)
        probs.sub_(probs.amax(dim=-1, keepdim=True)).exp_()
        probs.div_(probs.sum(dim=-1, keepdim=True))
        outs.append(probs @ v)
        if want == "influence":
            influence += probs.sum(dim=2).mean(dim=1).float()
        else:
            ent = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean(1).float()
            signal_parts.append(ent / max(math.log(m), 1e-6))
    out = torch.cat(outs, dim=2).transpose(1, 2).reshape(b, n, h * d).to(q.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    signal = influence if want == "influence" else torch.cat(signal_parts, dim=1)
    return out, signal

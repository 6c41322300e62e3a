"""Key/value reuse for partial self-attention (`TokenCacheConfig.reuse_kv`).

On a partial step a self-attention unit takes its queries from the fresh tokens and its keys and values from every
token; by default the keys and values of the reused tokens are projected again from their current inputs, which
costs 2 N D^2 MACs per call however few tokens are fresh. With K/V reuse, a unit keeps every token's key and value
projections from when the token was last computed, projects only the fresh tokens, and writes them in, so a partial
step costs (queries, keys, values, output) on k tokens plus the attention over N. The reused tokens' keys are then
as stale as their outputs: less work, at some fidelity cost (measured in `bench/kv-reuse/`).

Covers diffusers `Attention` with a plain processor (`attention.check_standard_attention`) run by the `MODULE`
runner (DiT, PixArt `attn1`). On a full step followed by partial ones the unit runs `full_attention`, which
returns the keys and values to keep; every other full step runs the module itself, so sparsity 0 is untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffsparse.cache.rows import put_rows, take_rows


def _split(attn, x: torch.Tensor) -> torch.Tensor:
    """(B, S, H * D) -> (B, H, S, D)."""
    return x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)


def attend(attn, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`attn`'s output for the query tokens `queries` (B, k, D) over projected `keys` / `values` (B, N, D_kv), in
    the order of diffusers' `AttnProcessor2_0` (projection, head split, q/k norms, SDPA, output projection)."""
    q = attn.to_q(queries)
    q, k, v = _split(attn, q), _split(attn, keys), _split(attn, values)
    if getattr(attn, "norm_q", None) is not None:
        q = attn.norm_q(q)
    if getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(queries.shape[0], -1, attn.heads * q.shape[-1]).to(q.dtype)
    return attn.to_out[1](attn.to_out[0](out))


def full_attention(attn, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Self-attention of `attn` on all tokens of `x` (B, N, D), and the `(keys, values)` to keep."""
    kv = attn.to_k(x), attn.to_v(x)
    return attend(attn, x, *kv), kv


def partial_attention(attn, x: torch.Tensor, rows: torch.Tensor, k: int, kv, in_place: bool):
    """Self-attention output of the `k` fresh tokens (`rows` of the (B * N, D) view of `x`), with keys and values
    of the fresh tokens projected now and of the others taken from `kv` (updated, in place when allowed); returns
    `(output (B, k, D), kv)`."""
    fresh = take_rows(x, rows, k)
    keys = put_rows(kv[0], rows, attn.to_k(fresh), in_place)
    values = put_rows(kv[1], rows, attn.to_v(fresh), in_place)
    return attend(attn, fresh, keys, values), (keys, values)

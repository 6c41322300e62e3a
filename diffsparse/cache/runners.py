"""Fresh-token computes that a module's own forward cannot do, written with the module's own layers.

- Rotary self-attention (Wan `attn1`): queries from the fresh tokens rotated by *their* positions, keys and values
  from all current tokens rotated by all positions.
- One stream of a joint attention (FLUX dual-stream `attn`): queries from the fresh tokens of the image stream
  and/or the text stream; keys and values always from every text and image token (text is never dropped).
- A single-stream block (FLUX): norm, attention and MLP side by side on all text tokens and the fresh image tokens;
  keys and values from every token. The block's residual branch (its output minus its input) is what is cached.

On full steps before partial ones, the `toca` selector's FLUX signal (DiffSparse A.5.1: lambda_2 on the
cross-attention entropy) is each image query's attention entropy over the text tokens (`joint_text_entropy`,
`single_stream_text_entropy`).

All three use `scaled_dot_product_attention`. With every token fresh they compute what the module computes, up
to float rounding; the hooks still call the module itself whenever a unit computes all of its tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffsparse.cache.rows import take_rows


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of `x` (B, S, H, D) whose pairs (2i, 2i+1) turn by the angles in `cos`/`sin`
    (broadcastable to x, each angle repeated for both members of its pair)."""
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (x.float() * cos + turned.float() * sin).type_as(x)


def rotary_table(rotary: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`(cos, sin)` as (S, D) tables, from FLUX's (S, D) or Wan's (1, S, 1, D)."""
    return tuple(f.reshape(-1, f.shape[-1]) for f in rotary)


def _at(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of a (S, D) rotary table for positions (B, k), shaped (B, k, 1, D) to broadcast over heads."""
    return table[positions].unsqueeze(2)


def _heads(attn, proj: torch.nn.Module, norm: torch.nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """`proj(x)` split into heads (B, S, H, D), with the query/key norm where the model puts it: over all heads
    (Wan's `rms_norm_across_heads`) or per head (FLUX)."""
    y = proj(x)
    width = getattr(norm, "normalized_shape", None) or (getattr(norm, "dim", None),)
    if norm is not None and tuple(width)[-1] == y.shape[-1]:
        return norm(y).unflatten(-1, (attn.heads, -1))
    y = y.unflatten(-1, (attn.heads, -1))
    return norm(y) if norm is not None else y


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention of (B, S, H, D) tensors, returned as (B, S, H * D)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2).type_as(q)


def check_plain(attn: torch.nn.Module, name: str) -> None:
    """Refuse attention modules these computes do not cover (fused projections, image-prompt adapters)."""
    if getattr(attn, "fused_projections", False):
        raise ValueError(f"{name}: fused q/k/v projections are not supported; call `unfuse_qkv_projections()`.")
    processor = type(getattr(attn, "processor", None)).__name__
    if processor not in ("FluxAttnProcessor", "WanAttnProcessor", "NoneType"):
        raise ValueError(f"{name}: attention processor {processor} is not supported by the token cache.")
    if getattr(attn, "add_k_proj", None) is not None and getattr(attn, "add_q_proj", None) is None:
        raise ValueError(f"{name}: image-conditioned cross-attention (Wan I2V) is not supported yet.")


def rope_self_attention(attn, x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, rotary) -> torch.Tensor:
    """Wan self-attention output (B, k, D) for the fresh tokens `idx` (B, k) of `x` (B, N, D)."""
    cos, sin = rotary_table(rotary)
    key = rotate(_heads(attn, attn.to_k, attn.norm_k, x), cos[None, :, None], sin[None, :, None])
    value = attn.to_v(x).unflatten(-1, (attn.heads, -1))
    fresh = take_rows(x, rows, idx.shape[1])
    query = rotate(_heads(attn, attn.to_q, attn.norm_q, fresh), _at(cos, idx), _at(sin, idx))
    return attn.to_out[1](attn.to_out[0](_attend(query, key, value)))


def joint_attention(attn, img: torch.Tensor, txt: torch.Tensor, img_fresh, txt_fresh, rotary):
    """FLUX dual-stream attention for some tokens of each stream.

    Args:
        img, txt: the normed image (B, N, D) and text (B, M, D) tokens, all of them (keys and values).
        img_fresh, txt_fresh: `(idx (B, k), rows)` of the tokens to compute in each stream, or None for none.
        rotary: FLUX's `(cos, sin)` over the text tokens, then the image tokens.

    Returns:
        `(image output (B, k_img, D) or None, text output (B, k_txt, D) or None)`.
    """
    cos, sin = rotary_table(rotary)
    m = txt.shape[1]
    key = torch.cat(
        [_heads(attn, attn.add_k_proj, attn.norm_added_k, txt), _heads(attn, attn.to_k, attn.norm_k, img)], 1
    )
    key = rotate(key, cos[None, :, None], sin[None, :, None])
    value = torch.cat([attn.add_v_proj(txt), attn.to_v(img)], dim=1).unflatten(-1, (attn.heads, -1))
    queries, positions = [], []
    if txt_fresh is not None:
        idx, rows = txt_fresh
        queries.append(_heads(attn, attn.add_q_proj, attn.norm_added_q, _fresh(txt, idx, rows)))
        positions.append(idx)
    if img_fresh is not None:
        idx, rows = img_fresh
        queries.append(_heads(attn, attn.to_q, attn.norm_q, _fresh(img, idx, rows)))
        positions.append(idx + m)
    positions = torch.cat(positions, dim=1)
    query = rotate(torch.cat(queries, dim=1), _at(cos, positions), _at(sin, positions))
    out = _attend(query, key, value)
    k_txt = txt_fresh[0].shape[1] if txt_fresh is not None else 0
    txt_out = attn.to_add_out(out[:, :k_txt]) if txt_fresh is not None else None
    img_out = attn.to_out[1](attn.to_out[0](out[:, k_txt:])) if img_fresh is not None else None
    return img_out, txt_out


def single_stream_branch(block, img: torch.Tensor, txt: torch.Tensor, temb, rotary, img_fresh):
    """FLUX single-stream block's residual branch for every text token and the fresh image tokens.

    Returns:
        `(text branch (B, M, D), image branch (B, k, D) or None)`: the block's output minus its input.
    """
    cos, sin = rotary_table(rotary)
    b, m = txt.shape[:2]
    attn = block.attn
    normed, gate = block.norm(torch.cat([txt, img], dim=1), emb=temb)
    key = rotate(_heads(attn, attn.to_k, attn.norm_k, normed), cos[None, :, None], sin[None, :, None])
    value = attn.to_v(normed).unflatten(-1, (attn.heads, -1))
    positions = torch.arange(m, device=img.device).expand(b, m)
    fresh = normed[:, :m]
    if img_fresh is not None:
        idx, rows = img_fresh
        fresh = torch.cat([fresh, _fresh(normed[:, m:], idx, rows)], dim=1)
        positions = torch.cat([positions, idx + m], dim=1)
    query = rotate(_heads(attn, attn.to_q, attn.norm_q, fresh), _at(cos, positions), _at(sin, positions))
    mixed = torch.cat([_attend(query, key, value), block.act_mlp(block.proj_mlp(fresh))], dim=2)
    branch = gate.unsqueeze(1) * block.proj_out(mixed)
    return branch[:, :m], (branch[:, m:] if img_fresh is not None else None)


def _fresh(x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The fresh tokens of x; `rows` None means all of them (no copy)."""
    return x if rows is None else take_rows(x, rows, idx.shape[1])


def text_entropy(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Entropy of each query's attention over the text keys alone (the softmax of its scores over them), averaged
    over heads and divided by log M so it lies in [0, 1]: `(B, N)` from queries (B, N, H, D) and text keys
    (B, M, H, D), both normed and rotated as the attention uses them."""
    logits = torch.einsum("bnhd,bmhd->bhnm", query.float(), key.float()) * query.shape[-1] ** -0.5
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean(1) / max(math.log(key.shape[1]), 1e-6)


def _rotated(attn, proj, norm, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return rotate(_heads(attn, proj, norm, x), cos[None, :, None], sin[None, :, None])


def joint_text_entropy(attn, img: torch.Tensor, txt: torch.Tensor, rotary) -> torch.Tensor:
    """`text_entropy` of the image queries of a FLUX dual-stream attention (its normed image and text tokens)."""
    cos, sin = rotary_table(rotary)
    m = txt.shape[1]
    key = _rotated(attn, attn.add_k_proj, attn.norm_added_k, txt, cos[:m], sin[:m])
    return text_entropy(_rotated(attn, attn.to_q, attn.norm_q, img, cos[m:], sin[m:]), key)


def single_stream_text_entropy(block, img: torch.Tensor, txt: torch.Tensor, temb, rotary) -> torch.Tensor:
    """`text_entropy` of the image queries of a FLUX single-stream block (its input image and text tokens)."""
    cos, sin = rotary_table(rotary)
    m, attn = txt.shape[1], block.attn
    normed, _ = block.norm(torch.cat([txt, img], dim=1), emb=temb)
    key = _rotated(attn, attn.to_k, attn.norm_k, normed[:, :m], cos[:m], sin[:m])
    return text_entropy(_rotated(attn, attn.to_q, attn.norm_q, normed[:, m:], cos[m:], sin[m:]), key)

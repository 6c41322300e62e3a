"""diffusers' `BasicTransformerBlock` (DiT, PixArt-alpha) at steps where the token cache need not run all of it.

- `reused_basic_block`: every one of its units reuses all tokens. Its output is then the input plus each unit's
  reused output under the block's current gate: nothing else of the block depends on those outputs, so its norms
  and modulations (which run on every token, and on a small model cost as much as the reused units themselves)
  need not run.
- `fresh_mlp_basic_block`: its MLP recomputes some tokens. The block runs as usual up to the MLP, whose norm and
  modulation then run on the MLP's fresh tokens only (the MLP's input is needed nowhere else); the MLP unit chooses
  those tokens from the residual stream instead of from its normed input, which changes nothing for a selector
  that does not read token values (`TokenSelector.reads_tokens`).

Both put the output together with the same operations in the same order as the block's own forward (diffusers'
`attention.py`), so it is the block's output bit for bit; for a configuration they do not cover they return None
and the block runs as usual.
"""

from __future__ import annotations

import torch

_COVERED = ("ada_norm_zero", "ada_norm_single")  # DiT's adaLN-Zero and PixArt's adaLN-single


def _covered(block, inputs: dict) -> bool:
    """Whether these functions cover the block with these forward arguments: adaLN-Zero or adaLN-single, no
    positional embedding inside the block, no GLIGEN."""
    extra = inputs.get("cross_attention_kwargs") or {}
    return (
        getattr(block, "norm_type", None) in _COVERED
        and getattr(block, "pos_embed", None) is None
        and "gligen" not in extra
    )


def _modulation(block, hidden_states: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, ...] | None:
    """The block's six adaLN modulations at this step (shift, scale and gate of the attention, then of the MLP),
    each (B, 1, D) as its forward broadcasts them, or None if not covered (adaLN-Zero without its own embedding)."""
    timestep = inputs.get("timestep")
    if block.norm_type == "ada_norm_zero":
        norm = block.norm1
        if norm.emb is None:
            return None
        emb = norm.emb(timestep, inputs.get("class_labels"), hidden_dtype=hidden_states.dtype)
        return tuple(chunk.unsqueeze(1) for chunk in norm.linear(norm.silu(emb)).chunk(6, dim=1))
    return (block.scale_shift_table[None] + timestep.reshape(hidden_states.shape[0], 6, -1)).chunk(6, dim=1)


def reused_basic_block(block, hidden_states: torch.Tensor, outputs: dict, inputs: dict) -> torch.Tensor | None:
    """The block's output from its units' reused outputs.

    Args:
        block: a diffusers `BasicTransformerBlock`.
        hidden_states: its input (B, N, D).
        outputs: each unit's output at this step (copied or forecast), by child name (`attn1`, `attn2`, `ff`).
        inputs: the block's other forward arguments by name (`timestep`, `class_labels`, `cross_attention_kwargs`).

    Returns:
        The output, or None where the block does something else too (another norm type, a positional embedding,
        GLIGEN, a sub-layer that is not a unit).
    """
    has_cross = getattr(block, "attn2", None) is not None
    if (
        not _covered(block, inputs)
        or (has_cross and "attn2" not in outputs)
        or "attn1" not in outputs
        or "ff" not in outputs
    ):
        return None
    modulation = _modulation(block, hidden_states, inputs)
    if modulation is None:
        return None
    gate_msa, gate_mlp = modulation[2], modulation[5]
    hidden_states = gate_msa * outputs["attn1"] + hidden_states
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.squeeze(1)
    if has_cross:
        hidden_states = outputs["attn2"] + hidden_states
    hidden_states = gate_mlp * outputs["ff"] + hidden_states
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.squeeze(1)
    return hidden_states


def fresh_mlp_basic_block(block, hidden_states: torch.Tensor, inputs: dict, mlp) -> torch.Tensor | None:
    """The block's output at a step where its MLP recomputes some of its tokens.

    Args:
        block: a diffusers `BasicTransformerBlock`.
        hidden_states: its input (B, N, D).
        inputs: the block's other forward arguments by name (as the block hook binds them).
        mlp: `mlp(stream, prepare)`, the MLP unit's output (B, N, D) at this step: it chooses its fresh tokens of
            `stream` (the residual stream before the MLP) and computes them from `prepare(their rows)`.

    Returns:
        The output, or None where the block is not covered (as `reused_basic_block`, or chunked feed-forward).
    """
    if not _covered(block, inputs) or block._chunk_size is not None or block.only_cross_attention:
        return None
    zero = block.norm_type == "ada_norm_zero"  # adaLN-Zero: norm1 modulates itself; adaLN-single: MLP norm is norm2
    if zero:  # the block's own call of norm1 (hooks on it see the block run), its modulations shaped (B, 1, D)
        norm_hidden_states, *mlp_and_gate = block.norm1(
            hidden_states, inputs.get("timestep"), inputs.get("class_labels"), hidden_dtype=hidden_states.dtype
        )
        gate_msa, shift_mlp, scale_mlp, gate_mlp = (m.unsqueeze(1) for m in mlp_and_gate)
    else:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(block, hidden_states, inputs)
        norm_hidden_states = block.norm1(hidden_states) * (1 + scale_msa) + shift_msa
    cross_kwargs = dict(inputs.get("cross_attention_kwargs") or {})
    attn_output = block.attn1(
        norm_hidden_states, encoder_hidden_states=None, attention_mask=inputs.get("attention_mask"), **cross_kwargs
    )
    hidden_states = gate_msa * attn_output + hidden_states
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.squeeze(1)
    if block.attn2 is not None:
        attn_output = block.attn2(
            block.norm2(hidden_states) if zero else hidden_states,  # PixArt: no norm before cross-attention
            encoder_hidden_states=inputs.get("encoder_hidden_states"),
            attention_mask=inputs.get("encoder_attention_mask"),
            **cross_kwargs,
        )
        hidden_states = attn_output + hidden_states
    mlp_norm = block.norm3 if zero else block.norm2
    ff_output = gate_mlp * mlp(hidden_states, lambda rows: mlp_norm(rows) * (1 + scale_mlp) + shift_mlp)
    hidden_states = ff_output + hidden_states
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.squeeze(1)
    return hidden_states

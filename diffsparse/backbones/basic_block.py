"""diffusers' `BasicTransformerBlock` (DiT, PixArt-alpha) at a step where every one of its units reuses all tokens.

Its output is then the input plus each unit's reused output under the block's current gate: nothing else of the
block depends on those outputs, so its norms and modulations (which run on every token, and on a small model cost
as much as the reused units themselves) need not run. `reused_basic_block` puts that output together with the same
operations in the same order as the block's own forward (diffusers' `attention.py`), so it is the block's output
bit for bit; for a configuration it does not cover it returns None and the block runs as usual.
"""

from __future__ import annotations

import torch

_COVERED = ("ada_norm_zero", "ada_norm_single")  # DiT's adaLN-Zero and PixArt's adaLN-single


def _gates(block, hidden_states: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The block's attention and MLP gates at this step, as its forward shapes them, or None if not covered."""
    timestep = inputs.get("timestep")
    if block.norm_type == "ada_norm_zero":
        norm = block.norm1
        if norm.emb is None:
            return None
        emb = norm.emb(timestep, inputs.get("class_labels"), hidden_dtype=hidden_states.dtype)
        chunks = norm.linear(norm.silu(emb)).chunk(6, dim=1)
        return chunks[2].unsqueeze(1), chunks[5].unsqueeze(1)
    chunks = (block.scale_shift_table[None] + timestep.reshape(hidden_states.shape[0], 6, -1)).chunk(6, dim=1)
    return chunks[2], chunks[5]


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
    extra = inputs.get("cross_attention_kwargs") or {}
    has_cross = getattr(block, "attn2", None) is not None
    if (
        getattr(block, "norm_type", None) not in _COVERED
        or getattr(block, "pos_embed", None) is not None
        or "gligen" in extra
        or (has_cross and "attn2" not in outputs)
        or "attn1" not in outputs
        or "ff" not in outputs
    ):
        return None
    gates = _gates(block, hidden_states, inputs)
    if gates is None:
        return None
    gate_msa, gate_mlp = gates
    hidden_states = gate_msa * outputs["attn1"] + hidden_states
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.squeeze(1)
    if has_cross:
        hidden_states = outputs["attn2"] + hidden_states
    hidden_states = gate_mlp * outputs["ff"] + hidden_states
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.squeeze(1)
    return hidden_states

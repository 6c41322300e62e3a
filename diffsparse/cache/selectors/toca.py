"""`toca` (DiffSparse eq. 10, from ToCa): base = lambda_1 s1 + lambda_2 s2, from attention maps.

s1 (self-attention influence) and s2 (cross-attention entropy) are computed only on steps where the block's
attention unit runs on all tokens anyway and a later step will select tokens; there the attention runs as explicit
softmax(QK^T)V in chunks instead of fused SDPA (same MACs, more memory traffic). Partial steps reuse them, so a
partial unit call costs nothing beyond the top-k.
"""

from __future__ import annotations

import torch

from diffsparse.backbones.registry import IMAGE
from diffsparse.cache.selectors.base import ENTROPY, INFLUENCE, SelectorConfig, TokenSelector, register_selector


@register_selector
class ToCaSelector(TokenSelector):
    name = "toca"
    reads_attention = True
    reads_tokens = False  # attention signals, the reuse count and the spatial bonus: no token values

    def __init__(self, config: SelectorConfig, defaults: dict):
        weights = (config.self_attn_weight, config.cross_attn_weight)
        if all(w is None for w in weights) and "self_attn_weight" not in defaults:
            raise ValueError(
                "The toca selector ranks tokens by attention maps, which this backbone's attention (joint or rotary) "
                "does not expose: use selector='norm' (its default), 'similarity' or 'random'."
            )
        super().__init__(config, defaults)

    def base_score(self, x: torch.Tensor, state, unit) -> torch.Tensor:
        score = None  # float32; starting from the first term instead of zeros saves two operators per call
        for signal, weight in ((INFLUENCE, self.self_attn_weight), (ENTROPY, self.cross_attn_weight)):
            if weight != 0 and (signal != ENTROPY or unit.stream == IMAGE):  # entropy: an image token's
                term = weight * state.signals[(unit.block, signal)]
                term = term if term.dtype == torch.float32 else term.float()
                score = term if score is None else score + term
        return score if score is not None else torch.zeros(x.shape[:2], device=x.device)

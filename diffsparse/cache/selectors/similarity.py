"""`similarity`: base = 1 - cosine(input now, input when the token was last computed).

O(N D) per partial unit call, and one more `(B, N, D)` tensor per unit kept in memory (`needs_inputs`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffsparse.cache.selectors.base import TokenSelector, register_selector


@register_selector
class SimilaritySelector(TokenSelector):
    name = "similarity"
    needs_inputs = True

    def base_score(self, x: torch.Tensor, state, unit) -> torch.Tensor:
        return 1.0 - F.cosine_similarity(x.float(), state.inputs[unit.index].float(), dim=-1)

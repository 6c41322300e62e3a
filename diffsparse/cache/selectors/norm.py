"""`norm`: base = L2 norm of the unit's input token (O(N D) per partial unit call)."""

from __future__ import annotations

import torch

from diffsparse.cache.selectors.base import TokenSelector, register_selector


@register_selector
class NormSelector(TokenSelector):
    name = "norm"

    def base_score(self, x: torch.Tensor, state, unit) -> torch.Tensor:
        return x.float().norm(dim=-1)

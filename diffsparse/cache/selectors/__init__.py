"""Token selectors, one file each, found by name in the `SELECTORS` registry.

Adding a selector is one `TokenSelector` subclass with `@register_selector` in its own file (imported here):

| selector | base score | extra cost per partial unit call (beyond a top-k over N tokens) |
| --- | --- | --- |
| `toca` | lambda_1 self-attention influence + lambda_2 cross-attention entropy | none (maps from full steps) |
| `norm` | L2 norm of the unit's input token | O(N D) |
| `similarity` | 1 - cosine(input now, input when last computed) | O(N D), one more (B, N, D) per unit |
| `random` | seeded uniform noise | O(N) |
"""

from diffsparse.cache.selectors.base import (
    ENTROPY,
    INFLUENCE,
    SELECTORS,
    SelectorConfig,
    TokenSelector,
    make_selector,
    register_selector,
    spatial_bonus,
)
from diffsparse.cache.selectors.norm import NormSelector
from diffsparse.cache.selectors.random import RandomSelector
from diffsparse.cache.selectors.similarity import SimilaritySelector
from diffsparse.cache.selectors.toca import ToCaSelector

__all__ = [
    "ENTROPY",
    "INFLUENCE",
    "SELECTORS",
    "NormSelector",
    "RandomSelector",
    "SelectorConfig",
    "SimilaritySelector",
    "ToCaSelector",
    "TokenSelector",
    "make_selector",
    "register_selector",
    "spatial_bonus",
]

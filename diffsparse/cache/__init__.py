"""The token-cache runtime: hooks, selectors, and the public API to apply it to a model or a pipeline.

Internals (the learner's soft choice, pausing, trajectory replay, the controller) live in `diffsparse.cache.control`
and `diffsparse.cache.hooks`.
"""

from diffsparse.backbones.registry import BACKBONES, BackboneSpec, cacheable_units, find_units, supported_models
from diffsparse.cache.apply import (
    apply_token_cache,
    disable_token_cache,
    enable_token_cache,
    remove_token_cache,
    reset_token_cache,
)
from diffsparse.cache.config import TokenCacheConfig
from diffsparse.cache.selectors import SELECTORS, SelectorConfig, TokenSelector, register_selector
from diffsparse.cache.summary import TokenCacheSummary, token_cache_summary

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "SELECTORS",
    "SelectorConfig",
    "TokenCacheConfig",
    "TokenCacheSummary",
    "TokenSelector",
    "apply_token_cache",
    "cacheable_units",
    "disable_token_cache",
    "enable_token_cache",
    "find_units",
    "register_selector",
    "remove_token_cache",
    "reset_token_cache",
    "supported_models",
    "token_cache_summary",
]

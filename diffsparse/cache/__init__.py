"""The token-cache runtime: hooks, selectors, the backbone registry and MAC accounting."""

from diffsparse.backbones.registry import BACKBONES, BackboneSpec, cacheable_units, find_units, supported_models
from diffsparse.cache.hooks import (
    TokenCacheConfig,
    apply_token_cache,
    remove_token_cache,
    reset_token_cache,
    set_soft_choice,
    token_cache_controller,
    token_cache_paused,
    trajectory_replay,
)
from diffsparse.cache.selector import SELECTORS, SelectorConfig

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "SELECTORS",
    "SelectorConfig",
    "TokenCacheConfig",
    "apply_token_cache",
    "cacheable_units",
    "find_units",
    "remove_token_cache",
    "reset_token_cache",
    "set_soft_choice",
    "supported_models",
    "token_cache_controller",
    "token_cache_paused",
    "trajectory_replay",
]

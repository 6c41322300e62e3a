"""diffsparse: learned token sparsity for diffusion transformers, on stock diffusers models."""

from diffsparse.cache import (
    SelectorConfig,
    TokenCacheConfig,
    TokenCacheSummary,
    apply_token_cache,
    cacheable_units,
    disable_token_cache,
    enable_token_cache,
    register_selector,
    remove_token_cache,
    reset_token_cache,
    token_cache_summary,
)
from diffsparse.levels import SPARSITY_LEVELS
from diffsparse.models.loading import load_model
from diffsparse.schedule import Schedule, ScheduleError

__version__ = "0.1.0"

__all__ = [
    "SPARSITY_LEVELS",
    "Schedule",
    "ScheduleError",
    "SelectorConfig",
    "TokenCacheConfig",
    "TokenCacheSummary",
    "apply_token_cache",
    "cacheable_units",
    "disable_token_cache",
    "enable_token_cache",
    "load_model",
    "register_selector",
    "remove_token_cache",
    "reset_token_cache",
    "token_cache_summary",
]

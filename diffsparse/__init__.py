"""diffsparse: learned token sparsity for diffusion transformers, on stock diffusers models."""

from diffsparse.cache import (
    SelectorConfig,
    TokenCacheConfig,
    apply_token_cache,
    cacheable_units,
    remove_token_cache,
    reset_token_cache,
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
    "apply_token_cache",
    "cacheable_units",
    "load_model",
    "remove_token_cache",
    "reset_token_cache",
]

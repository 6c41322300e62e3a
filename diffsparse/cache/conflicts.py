"""diffusers' own caches (FirstBlockCache, TaylorSeer, PAB, FasterCache, MagCache, ...) and the token cache
exclude each other: both would skip or reuse the same computation, each unaware of the other."""

from __future__ import annotations

import torch

from diffsparse.model_hooks import hooks_under

# diffusers.hooks modules that define caches; any future `*cache*` module counts too.
_CACHE_MODULES = ("pyramid_attention_broadcast",)


def diffusers_caches(model: torch.nn.Module) -> list[str]:
    """What diffusers caching is on `model`: its `enable_cache` config and the cache hooks on it or its modules."""
    found = []
    config = getattr(model, "_cache_config", None)  # set by `CacheMixin.enable_cache`
    if config is not None:
        found.append(type(config).__name__)
    for path, name, hook in hooks_under(model):
        package, _, leaf = type(hook).__module__.rpartition(".")
        if package == "diffusers.hooks" and ("cache" in leaf or leaf in _CACHE_MODULES):
            found.append(f"{type(hook).__name__} ({name!r} on {path or 'the model'})")
    return found


def refuse_diffusers_caches(model: torch.nn.Module, doing: str) -> None:
    """Raise a RuntimeError naming the diffusers caches on `model`, if any, and how to take them off."""
    found = diffusers_caches(model)
    if found:
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        raise RuntimeError(
            f"{doing}: the model already has a diffusers cache ({', '.join(found[:3])}{more}), and the two would "
            "skip the same computation. Use one of them: take the diffusers cache off first "
            "(`transformer.disable_cache()`, or remove the hooks its `apply_*` added), or "
            "`remove_token_cache(transformer)` before `transformer.enable_cache(...)`."
        )

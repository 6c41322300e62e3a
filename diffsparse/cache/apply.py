"""Put the token cache on a diffusers transformer (or a pipeline's), take it off, reset it.

Pipelines that end their call with `maybe_free_model_hooks()` (all stock ones) reset the cache through the
stateful trajectory hook (models without diffusers' `CacheMixin`, DiT and PixArt, get the method it calls while
the cache is applied), so a call frees its cache when it ends and a second call starts clean. A plain sampling loop
has no such end: its cache is freed when the trajectory runs the schedule's last step, when the next trajectory
starts, or by `reset_token_cache` / `remove_token_cache`.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import fields

import torch
from diffusers.hooks import HookRegistry

from diffsparse.backbones.registry import (
    JOINT,
    ROPE_SELF,
    SINGLE_STREAM,
    UnitInfo,
    backbone_for,
    find_blocks,
    find_units,
)
from diffsparse.cache.attention import check_standard_attention
from diffsparse.cache.config import TokenCacheConfig
from diffsparse.cache.conflicts import refuse_diffusers_caches
from diffsparse.cache.hooks import (
    BLOCK_HOOK,
    TRAJECTORY_HOOK,
    UNIT_HOOK,
    PipelineReset,
    TokenCacheBlockHook,
    TokenCacheUnitHook,
    TrajectoryHook,
    token_cache_controller,
)
from diffsparse.cache.runners import check_plain
from diffsparse.cache.selectors import make_selector
from diffsparse.cache.state import TokenCacheController
from diffsparse.model_hooks import add_hook, drop_hook
from diffsparse.schedule import Schedule

_PIPELINE_RESET = "_reset_stateful_cache"  # what `DiffusionPipeline.maybe_free_model_hooks` calls on components


def _as_config(config: TokenCacheConfig | Schedule, options: dict) -> TokenCacheConfig:
    if isinstance(config, TokenCacheConfig):
        if options:
            raise TypeError("Pass either a TokenCacheConfig or a schedule with keyword options, not both.")
        config.validate()
        return config
    names = {f.name for f in fields(TokenCacheConfig)} - {"schedule"}
    unknown = set(options) - names
    if unknown:
        raise TypeError(f"Unknown token-cache option(s) {sorted(unknown)}; valid: {sorted(names)}.")
    return TokenCacheConfig(schedule=config, **options)


def apply_token_cache(model: torch.nn.Module, config: TokenCacheConfig | Schedule, **options) -> TokenCacheController:
    """Make `model` recompute only part of its tokens per unit and step, as the schedule says. In place.

    Refused (RuntimeError) when a token cache is already applied (`remove_token_cache` first) or a diffusers cache
    (`transformer.enable_cache(...)`, `apply_first_block_cache`, ...) is on the model.

    Args:
        model: a supported diffusers transformer (see `diffsparse.backbones.registry.BACKBONES`).
        config: a `TokenCacheConfig`, or a `Schedule` alone (made for `cacheable_units(model)` and for the
            pipeline's number of steps) with the other fields as keywords (`selector="norm"`, `cfg=True`).

    Returns:
        The controller (for inspection); the model itself is changed in place.

    Example:
        >>> sched = Schedule.uniform(pipe.transformer, num_steps=20, sparsity=0.5)
        >>> apply_token_cache(pipe.transformer, sched, selector="toca")
        >>> images = pipe(class_labels=[1, 2], num_inference_steps=20).images
        >>> remove_token_cache(pipe.transformer)
    """
    config = _as_config(config, options)
    schedule = config.schedule
    if not isinstance(schedule, Schedule):
        raise TypeError(
            f"schedule must be a diffsparse Schedule, got {type(schedule).__name__}: pass one, or a "
            "TokenCacheConfig(schedule=...)."
        )
    if token_cache_controller(model) is not None:
        raise RuntimeError("A token cache is already applied to this model: call remove_token_cache(model) first.")
    refuse_diffusers_caches(model, "Cannot apply the token cache")
    spec = backbone_for(model)
    units = find_units(model)
    defaults = dict(spec.selector_defaults)
    if schedule.meta.get("selector"):  # unless told otherwise, a schedule runs with the selector it was learned with
        defaults["name"] = schedule.meta["selector"]
    selector = make_selector(config.selector, defaults)
    controller = TokenCacheController(
        spec, units, schedule, selector, config.cfg, config.order(), config.factor_dtype(), config.reuse_kv
    )
    for u in units:
        if controller.reuse_kv[u.index]:
            check_standard_attention(u.module, u.name, "key/value reuse (reuse_kv=True)")
    if selector.signals:
        for u in units:
            if u.runner == SINGLE_STREAM:  # FLUX computes its maps in the runners (JOINT: checked below)
                check_plain(u.module.attn, u.name)
            elif u.runner != JOINT and any(row[u.index] is not None for row in controller.signal_plan):
                check_standard_attention(u.module, u.name)

    by_module: dict[int, list[UnitInfo]] = {}
    for u in units:
        by_module.setdefault(id(u.module), []).append(u)
        if u.runner in (ROPE_SELF, JOINT):
            check_plain(u.module, u.name)
    signature = inspect.signature(type(model).forward)
    compile_options = config.compile_options()
    unit_hooks = {}
    for group in by_module.values():
        module = group[0].module
        hook = TokenCacheUnitHook(controller, group, inspect.signature(module.forward))
        add_hook(module, hook, UNIT_HOOK)
        unit_hooks[group[0].index] = hook
        if compile_options is not None:
            hook.compute = torch.compile(hook.fn_ref.original_forward, **compile_options)
    if config.skip_blocks:
        # The MLP's fresh tokens are chosen on the residual stream: only for selectors that read no values (nor keep
        # the units' inputs).
        plain = not selector.reads_tokens and not selector.needs_inputs
        for index, _, block, blocks in find_blocks(model):
            if blocks.reused is None and blocks.fresh_mlp is None:
                continue
            named = {u.name.rsplit(".", 1)[-1]: u for u in units if u.block == index}
            mlp = unit_hooks[named["ff"].index] if "ff" in named and plain else None
            hook = TokenCacheBlockHook(controller, index, named, blocks, inspect.signature(block.forward), mlp)
            add_hook(block, hook, BLOCK_HOOK)
    add_hook(model, TrajectoryHook(controller, signature), TRAJECTORY_HOOK)
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
    if not hasattr(model, _PIPELINE_RESET):
        # Stock pipelines end each call with `maybe_free_model_hooks()`, which resets the stateful hooks only of
        # components that have `_reset_stateful_cache` (diffusers' `CacheMixin`); DiT and PixArt models lack it, so
        # give this instance one: a call that stops before the schedule's last step then frees its cache (and
        # warns) at its end instead of holding it until the next call.
        setattr(model, _PIPELINE_RESET, PipelineReset(controller))
    return controller


def remove_token_cache(model: torch.nn.Module) -> None:
    """Take the token cache off `model`: it is the original model again, with no hooks of ours left. Without a
    token cache it only warns (`UserWarning`)."""
    _remove(model, stacklevel=3)


def _remove(model: torch.nn.Module, stacklevel: int) -> None:
    controller = token_cache_controller(model)
    if controller is None:
        message = "No token cache is applied to this model: nothing to remove."
        warnings.warn(message, UserWarning, stacklevel=stacklevel)
        return
    controller.reset()  # frees the cached tensors (the caller may still hold the controller); warns on a short run
    if isinstance(model.__dict__.get(_PIPELINE_RESET), PipelineReset):
        del model.__dict__[_PIPELINE_RESET]
    drop_hook(model, TRAJECTORY_HOOK)
    for module in {id(u.module): u.module for u in find_units(model)}.values():
        drop_hook(module, UNIT_HOOK)
    for _, _, block, _ in find_blocks(model):
        drop_hook(block, BLOCK_HOOK)
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None:
        registry.invalidate_child_registries_cache()


def reset_token_cache(model: torch.nn.Module) -> None:
    """Forget every cached tensor: the next forward starts a new trajectory at step 0."""
    controller = token_cache_controller(model)
    if controller is None:
        raise RuntimeError("No token cache is applied to this model.")
    controller.reset()


def _transformer(pipe) -> torch.nn.Module:
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(
            f"{type(pipe).__name__} has no `transformer` component: enable_token_cache / disable_token_cache take a "
            "diffusers pipeline; for a bare model use apply_token_cache(model, schedule) / remove_token_cache(model)."
        )
    return transformer


def enable_token_cache(pipe, config: TokenCacheConfig | Schedule, **options) -> TokenCacheController:
    """`apply_token_cache` on a pipeline's transformer (`pipe.transformer`); the same arguments and refusals.

    Example:
        >>> enable_token_cache(pipe, Schedule.uniform(pipe.transformer, num_steps=20, sparsity=0.5))
        >>> images = pipe(class_labels=[207, 360], num_inference_steps=20).images
        >>> disable_token_cache(pipe)
    """
    return apply_token_cache(_transformer(pipe), config, **options)


def disable_token_cache(pipe) -> None:
    """`remove_token_cache` on a pipeline's transformer; without a token cache it only warns."""
    _remove(_transformer(pipe), stacklevel=3)

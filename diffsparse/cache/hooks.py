"""The token-cache runtime: removable hooks on a diffusers transformer's unit modules.

Shape of `diffusers.hooks`: a config dataclass, a state object with `reset()` (`TrajectoryState`), hook classes
registered in each module instance's `HookRegistry`, and public `apply_token_cache` / `remove_token_cache` /
`reset_token_cache`. Pipelines that end their call with `maybe_free_model_hooks()` (all stock ones) reset the cache
through the stateful trajectory hook, so a second call starts clean.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager

from ..schedule import Schedule
from .attention import attention_with_signals, check_standard_attention
from .backbones import SELF_ATTN, UnitInfo, backbone_for, find_units
from .blend import blend_forward
from .rows import flat_rows, put_rows, take_rows
from .selector import SelectorConfig, make_selector
from .state import TokenCacheController, TrajectoryState

_TRAJECTORY_HOOK = "diffsparse_token_cache_trajectory"
_UNIT_HOOK = "diffsparse_token_cache_unit"


@dataclass
class TokenCacheConfig:
    """Options of the token cache.

    Attributes:
        selector: a selector name (`toca`, `norm`, `similarity`, `random`), a `SelectorConfig`, or a dict of
            its fields.
        cfg: whether the batch holds classifier-free-guidance halves that must pick the same tokens: `"auto"` (the
            two halves of the first step's input are equal), `True` or `False`.
    """

    selector: str | SelectorConfig | dict = field(default_factory=SelectorConfig)
    cfg: bool | str = "auto"


class _ContextReceiver(StateManager):
    """Receives the `CacheContext` that pipelines set with `transformer.cache_context(...)`."""

    def __init__(self):
        super().__init__(TrajectoryState)
        self.latest = None

    def set_context(self, context) -> None:
        super().set_context(context)
        self.latest = context


class TrajectoryHook(ModelHook):
    """On the transformer itself: before each forward, tells the controller which step this is."""

    _is_stateful = True

    def __init__(self, controller: TokenCacheController, signature: inspect.Signature):
        super().__init__()
        self.controller = controller
        self.signature = signature
        self.contexts = _ContextReceiver()

    def pre_forward(self, module, *args, **kwargs):
        if not self.controller.paused:
            bound = self.signature.bind_partial(module, *args, **kwargs).arguments
            self.controller.begin_forward(module, bound["hidden_states"], bound.get("timestep"), self.contexts.latest)
        return args, kwargs

    def post_forward(self, module, output):
        if not self.controller.paused:
            self.controller.end_forward()
        return output

    def reset_state(self, module):
        self.controller.reset()
        return module


class TokenCacheUnitHook(ModelHook):
    """On one unit (attention or feed-forward module): compute all, reuse all, or recompute the top-k tokens."""

    def __init__(self, controller: TokenCacheController, unit: UnitInfo):
        super().__init__()
        self.controller = controller
        self.unit = unit

    def new_forward(self, module, hidden_states, *args, **kwargs):
        ctl, u = self.controller, self.unit
        state = ctl.current
        original = self.fn_ref.original_forward
        if state is None or ctl.paused:
            return original(hidden_states, *args, **kwargs)
        if ctl.choice is not None:
            return blend_forward(self, module, hidden_states, *args, **kwargs)
        keep_inputs = ctl.selector.needs_inputs
        s = ctl.sparsity(state.step, u.index)
        if s == 0.0:
            signal = ctl.signal_plan[state.step][u.index]
            if signal is None:
                out = original(hidden_states, *args, **kwargs)
            else:
                context = hidden_states if u.kind == SELF_ATTN else kwargs["encoder_hidden_states"]
                mask = kwargs.get("attention_mask")
                out, state.signals[(u.block, signal)] = attention_with_signals(
                    module, hidden_states, context, mask, signal
                )
            state.store_full(u.index, out, hidden_states, keep_inputs)
            return out

        cache = state.cache.get(u.index)
        if cache is None or cache.shape[0] != hidden_states.shape[0] or cache.shape[1] != hidden_states.shape[1]:
            raise RuntimeError(
                f"Unit {u.name} has no cached output for this batch at step {state.step}: a trajectory must start "
                "with a full step. Call reset_token_cache(model) before sampling with a new batch size or resolution."
            )
        if s == 1.0:
            return cache
        k = ctl.fresh(state.step, u.index, hidden_states.shape[1])
        idx = ctl.selector.select(hidden_states, k, state, u)
        rows = flat_rows(idx, hidden_states.shape[1])
        x_fresh = take_rows(hidden_states, rows, k)
        if u.kind == SELF_ATTN:
            # Queries from the fresh tokens, keys and values from all current tokens.
            kwargs = {**kwargs, "encoder_hidden_states": hidden_states}
        out_fresh = original(x_fresh, *args, **kwargs)
        cache = put_rows(cache, rows, out_fresh)
        state.store_partial(u.index, cache, idx, rows, x_fresh, keep_inputs)
        return cache


def _controller(model: torch.nn.Module) -> TokenCacheController | None:
    registry = getattr(model, "_diffusers_hook", None)
    hook = registry.get_hook(_TRAJECTORY_HOOK) if registry is not None else None
    return hook.controller if hook is not None else None


def apply_token_cache(
    model: torch.nn.Module, schedule: Schedule, config: TokenCacheConfig | None = None, **options
) -> TokenCacheController:
    """Make `model` recompute only part of its tokens per unit and step, as `schedule` says. In place.

    Args:
        model: a supported diffusers transformer (see `diffsparse.cache.backbones.BACKBONES`).
        schedule: made for `cacheable_units(model)` and for the pipeline's number of steps.
        config: a `TokenCacheConfig`; or pass its fields as keywords (`selector="norm"`, `cfg=True`).

    Returns:
        The controller (for inspection); the model itself is changed in place.

    Example:
        >>> sched = Schedule.uniform(cacheable_units(pipe.transformer), num_steps=20, sparsity=0.5)
        >>> apply_token_cache(pipe.transformer, sched, selector="toca")
        >>> images = pipe(class_labels=[1, 2], num_inference_steps=20).images
        >>> remove_token_cache(pipe.transformer)
    """
    if config is None:
        names = {f.name for f in fields(TokenCacheConfig)}
        unknown = set(options) - names
        if unknown:
            raise TypeError(f"Unknown token-cache option(s) {sorted(unknown)}; valid: {sorted(names)}.")
        config = TokenCacheConfig(**options)
    elif options:
        raise TypeError("Pass either a TokenCacheConfig or keyword options, not both.")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a diffsparse Schedule, got {type(schedule).__name__}.")
    if _controller(model) is not None:
        raise RuntimeError("A token cache is already applied to this model: call remove_token_cache(model) first.")
    spec = backbone_for(model)
    units = find_units(model)
    selector = make_selector(config.selector, spec.selector_defaults)
    controller = TokenCacheController(spec, units, schedule, selector, config.cfg)
    if selector.signals:
        for u in units:
            if any(row[u.index] is not None for row in controller.signal_plan):
                check_standard_attention(u.module, u.name)

    signature = inspect.signature(type(model).forward)
    for u in units:
        HookRegistry.check_if_exists_or_initialize(u.module).register_hook(
            TokenCacheUnitHook(controller, u), _UNIT_HOOK
        )
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(TrajectoryHook(controller, signature), _TRAJECTORY_HOOK)
    registry.invalidate_child_registries_cache()
    return controller


def remove_token_cache(model: torch.nn.Module) -> None:
    """Take the token cache off `model`: it is the original model again, with no hooks of ours left."""
    if _controller(model) is None:
        raise RuntimeError("No token cache is applied to this model.")
    _drop_hook(model, _TRAJECTORY_HOOK)
    for u in find_units(model):
        _drop_hook(u.module, _UNIT_HOOK)
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None:
        registry.invalidate_child_registries_cache()


def _drop_hook(module: torch.nn.Module, name: str) -> None:
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return
    registry.remove_hook(name, recurse=False)
    if not registry.hooks:
        del module._diffusers_hook
        # HookRegistry leaves the original bound `forward` as an instance attribute; drop it so the module is as new.
        leftover = module.__dict__.get("forward")
        if getattr(leftover, "__func__", None) is type(module).forward:
            del module.__dict__["forward"]


def reset_token_cache(model: torch.nn.Module) -> None:
    """Forget every cached tensor: the next forward starts a new trajectory at step 0."""
    controller = _controller(model)
    if controller is None:
        raise RuntimeError("No token cache is applied to this model.")
    controller.reset()


def set_soft_choice(model: torch.nn.Module, schedule: Schedule, choice: torch.Tensor | None) -> None:
    """Give the applied token cache a new schedule; with `choice` (T, U, |S|), the straight-through one-hot of its
    levels, units run in training mode: all tokens computed, blended with the cache so the loss reaches `choice`.
    `choice=None` goes back to the inference path."""
    controller = _controller(model)
    if controller is None:
        raise RuntimeError("No token cache is applied to this model.")
    controller.set_schedule(schedule, choice)


@contextmanager
def token_cache_paused(model: torch.nn.Module):
    """Inside the block the model runs dense (its original forward), e.g. for a teacher rollout; the cache
    is left as it was."""
    controller = _controller(model)
    if controller is None:
        raise RuntimeError("No token cache is applied to this model.")
    controller.paused = True
    try:
        yield model
    finally:
        controller.paused = False


def trajectory_replay(model: torch.nn.Module):
    """For recomputing a denoising step later (gradient checkpointing); None without a token cache.

    Returns a context-manager factory: inside `with replay():` the token cache is as it is now (schedule, mode and
    trajectory state), so the step sees the cache it first saw; on exit the live state is put back.
    """
    controller = _controller(model)
    if controller is None:
        return None
    restore = controller.snapshot()

    @contextmanager
    def replay():
        live = controller.snapshot()
        restore()
        try:
            yield
        finally:
            live()

    return replay


def token_cache_controller(model: torch.nn.Module) -> TokenCacheController | None:
    """The controller of the token cache applied to `model`, or None."""
    return _controller(model)

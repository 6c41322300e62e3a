"""The token-cache runtime: removable hooks on a diffusers transformer's unit modules.

Shape of `diffusers.hooks`: a config dataclass, a state object with `reset()` (`TrajectoryState`), hook classes
registered in each module instance's `HookRegistry`, and public `apply_token_cache` / `remove_token_cache` /
`reset_token_cache`. Pipelines that end their call with `maybe_free_model_hooks()` (all stock ones) reset the cache
through the stateful trajectory hook (models without diffusers' `CacheMixin`, DiT and PixArt, get the method it
calls while the cache is applied), so a call frees its cache when it ends and a second call starts clean. A plain
sampling loop has no such end: its cache is freed when the trajectory runs the schedule's last step, when the next
trajectory starts, or by `reset_token_cache` / `remove_token_cache`.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager

from diffsparse.backbones.registry import (
    JOINT,
    ROPE_SELF,
    SELF_ATTN,
    SINGLE_STREAM,
    UnitInfo,
    backbone_for,
    find_units,
)
from diffsparse.cache.attention import attention_with_signals, check_standard_attention
from diffsparse.cache.blend import blend_forward, blend_output
from diffsparse.cache.rows import flat_rows, put_rows, take_rows
from diffsparse.cache.runners import check_plain, joint_attention, rope_self_attention, single_stream_branch
from diffsparse.cache.selector import SelectorConfig, make_selector
from diffsparse.cache.state import TokenCacheController, TrajectoryState
from diffsparse.schedule import Schedule

_TRAJECTORY_HOOK = "diffsparse_token_cache_trajectory"
_UNIT_HOOK = "diffsparse_token_cache_unit"
_PIPELINE_RESET = "_reset_stateful_cache"  # what `DiffusionPipeline.maybe_free_model_hooks` calls on components


@dataclass
class TokenCacheConfig:
    """Options of the token cache.

    Attributes:
        selector: a selector name (`toca`, `norm`, `similarity`, `random`), a `SelectorConfig`, or a dict of
            its fields.
        cfg: whether the batch holds classifier-free-guidance halves that must pick the same tokens: `"auto"` (the
            two halves of the first step's input are equal), `True` or `False`; anything else raises a ValueError.
    """

    selector: str | SelectorConfig | dict = field(default_factory=SelectorConfig)
    cfg: bool | str = "auto"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise a `ValueError` for an option outside what is documented above."""
        if not (isinstance(self.cfg, bool) or (isinstance(self.cfg, str) and self.cfg == "auto")):
            raise ValueError(
                f"Token-cache option cfg={self.cfg!r} is not valid: use cfg=True (the batch is classifier-free-"
                "guidance halves), cfg=False (it is not), or cfg='auto' (detect it at the first step)."
            )


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
            self.controller.begin_forward(module, bound, bound.get("timestep"), self.contexts.latest)
        return args, kwargs

    def post_forward(self, module, output):
        if not self.controller.paused:
            self.controller.end_forward()
        return output

    def reset_state(self, module):
        self.controller.reset()
        return module


class TokenCacheUnitHook(ModelHook):
    """On one unit's module: compute all, reuse all, or recompute the top-k tokens.

    A FLUX joint attention module carries two units (its image and its text stream); every other module one.
    """

    def __init__(self, controller: TokenCacheController, units: list[UnitInfo], signature: inspect.Signature):
        super().__init__()
        self.controller = controller
        self.units = units
        self.unit = units[0]
        self.signature = signature

    def new_forward(self, module, *args, **kwargs):
        ctl, u = self.controller, self.unit
        original = self.fn_ref.original_forward
        if ctl.current is None or ctl.paused:
            return original(*args, **kwargs)
        if u.runner == JOINT:
            return self._joint(module, args, kwargs)
        if u.runner == SINGLE_STREAM:
            return self._single_stream(module, args, kwargs)
        if not args:
            args = (kwargs.pop("hidden_states"),)
        return self._one(module, *args, **kwargs)

    # --- helpers --------------------------------------------------------------------------------------------------
    def _cached(self, u: UnitInfo, x: torch.Tensor) -> torch.Tensor:
        state = self.controller.current
        cache = state.cache.get(u.index)
        if cache is None or cache.shape[0] != x.shape[0] or cache.shape[1] != x.shape[1]:
            raise RuntimeError(
                f"Unit {u.name} has no cached output for this batch at step {state.step}: a trajectory must start "
                "with a full step. Call reset_token_cache(model) before sampling with a new batch size or resolution."
            )
        return cache

    def _choose(self, u: UnitInfo, x: torch.Tensor, s: float):
        """The fresh tokens of `u` at sparsity `s` < 1: `(idx (B, k), rows)`; rows None when all are fresh."""
        ctl, state = self.controller, self.controller.current
        b, n = x.shape[:2]
        if s == 0.0:
            return torch.arange(n, device=x.device).expand(b, n), None
        self._cached(u, x)
        idx = ctl.selector.select(x, ctl.fresh(state.step, u.index, n), state, u)
        return idx, flat_rows(idx, n)

    def _store(self, u: UnitInfo, x: torch.Tensor, out: torch.Tensor, chosen) -> torch.Tensor:
        """Record the fresh outputs `out` of `u` (input `x`); returns its full output (B, N, D)."""
        state, keep = self.controller.current, self.controller.selector.needs_inputs
        idx, rows = chosen
        if rows is None:
            state.store_full(u.index, out, x, keep)
            return out
        cache = put_rows(state.cache[u.index], rows, out)
        state.store_partial(u.index, cache, idx, rows, take_rows(x, rows, idx.shape[1]) if keep else None, keep)
        return cache

    # --- runners --------------------------------------------------------------------------------------------------
    def _one(self, module, hidden_states, *args, **kwargs):
        """A unit on one module whose first argument is its tokens (`MODULE` and `ROPE_SELF` runners)."""
        ctl, u = self.controller, self.unit
        state = ctl.current
        original = self.fn_ref.original_forward
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
        if s == 1.0:
            return self._cached(u, hidden_states)
        chosen = self._choose(u, hidden_states, s)
        if u.runner == ROPE_SELF:
            bound = self.signature.bind(hidden_states, *args, **kwargs).arguments
            if bound.get("attention_mask") is not None:
                raise ValueError(f"{u.name}: attention masks are not supported on partial steps.")
            out_fresh = rope_self_attention(module, hidden_states, *chosen, bound["rotary_emb"])
        else:
            x_fresh = take_rows(hidden_states, chosen[1], chosen[0].shape[1])
            if u.kind == SELF_ATTN:
                # Queries from the fresh tokens, keys and values from all current tokens.
                kwargs = {**kwargs, "encoder_hidden_states": hidden_states}
            out_fresh = original(x_fresh, *args, **kwargs)
        return self._store(u, hidden_states, out_fresh, chosen)

    def _joint(self, module, args, kwargs):
        """FLUX dual-stream attention: the image unit and the text unit, each at its own sparsity."""
        ctl = self.controller
        state = ctl.current
        img_u, txt_u = self.units
        bound = self.signature.bind(*args, **kwargs).arguments
        img, txt = bound["hidden_states"], bound["encoder_hidden_states"]
        dense = ctl.sparsity(state.step, img_u.index) == 0.0 and ctl.sparsity(state.step, txt_u.index) == 0.0
        if ctl.choice is not None or dense:
            out = self.fn_ref.original_forward(*args, **kwargs)
            if len(out) != 2:
                raise ValueError(f"{img_u.name}: image-prompt adapters are not supported by the token cache.")
            if ctl.choice is not None:
                return blend_output(ctl, img_u, img, out[0]), blend_output(ctl, txt_u, txt, out[1])
            state.store_full(img_u.index, out[0], img, ctl.selector.needs_inputs)
            state.store_full(txt_u.index, out[1], txt, ctl.selector.needs_inputs)
            return out
        if bound.get("attention_mask") is not None or bound.get("kwargs"):
            raise ValueError(f"{img_u.name}: attention masks and extra attention arguments are not supported.")
        chosen = []
        for u, x in ((img_u, img), (txt_u, txt)):
            s = ctl.sparsity(state.step, u.index)
            chosen.append(None if s == 1.0 else self._choose(u, x, s))
        if chosen == [None, None]:
            return self._cached(img_u, img), self._cached(txt_u, txt)
        fresh = joint_attention(module, img, txt, *chosen, bound["image_rotary_emb"])
        return tuple(
            self._cached(u, x) if c is None else self._store(u, x, f, c)
            for u, x, f, c in zip((img_u, txt_u), (img, txt), fresh, chosen, strict=True)
        )

    def _single_stream(self, block, args, kwargs):
        """FLUX single-stream block: its residual branch cached per image token; text tokens always computed."""
        ctl, u = self.controller, self.unit
        state = ctl.current
        bound = self.signature.bind(*args, **kwargs).arguments
        img, txt = bound["hidden_states"], bound["encoder_hidden_states"]
        s = ctl.sparsity(state.step, u.index)
        if ctl.choice is not None or s == 0.0:
            txt_out, img_out = self.fn_ref.original_forward(*args, **kwargs)
            if ctl.choice is not None:
                return txt_out, img + blend_output(ctl, u, img, img_out - img)
            state.store_full(u.index, img_out - img, img, ctl.selector.needs_inputs)
            return txt_out, img_out
        if bound.get("joint_attention_kwargs"):
            raise ValueError(f"{u.name}: extra attention arguments are not supported.")
        chosen = None if s == 1.0 else self._choose(u, img, s)
        rotary = bound["image_rotary_emb"]
        txt_branch, img_branch = single_stream_branch(block, img, txt, bound["temb"], rotary, chosen)
        img_branch = self._cached(u, img) if chosen is None else self._store(u, img, img_branch, chosen)
        return txt + txt_branch, img + img_branch


class _PipelineReset:
    """`model._reset_stateful_cache(recurse=True)` (the signature of diffusers' `CacheMixin`) for models without it:
    frees the token cache at the end of a pipeline call."""

    def __init__(self, controller: TokenCacheController):
        self.controller = controller

    def __call__(self, recurse: bool = True) -> None:
        self.controller.reset()


def _controller(model: torch.nn.Module) -> TokenCacheController | None:
    registry = getattr(model, "_diffusers_hook", None)
    hook = registry.get_hook(_TRAJECTORY_HOOK) if registry is not None else None
    return hook.controller if hook is not None else None


def apply_token_cache(
    model: torch.nn.Module, schedule: Schedule, config: TokenCacheConfig | None = None, **options
) -> TokenCacheController:
    """Make `model` recompute only part of its tokens per unit and step, as `schedule` says. In place.

    Args:
        model: a supported diffusers transformer (see `diffsparse.backbones.registry.BACKBONES`).
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
    else:
        config.validate()
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

    by_module: dict[int, list[UnitInfo]] = {}
    for u in units:
        by_module.setdefault(id(u.module), []).append(u)
        if u.runner in (ROPE_SELF, JOINT):
            check_plain(u.module, u.name)
    signature = inspect.signature(type(model).forward)
    for group in by_module.values():
        module = group[0].module
        hook = TokenCacheUnitHook(controller, group, inspect.signature(module.forward))
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, _UNIT_HOOK)
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(TrajectoryHook(controller, signature), _TRAJECTORY_HOOK)
    registry.invalidate_child_registries_cache()
    if not hasattr(model, _PIPELINE_RESET):
        # Stock pipelines end each call with `maybe_free_model_hooks()`, which resets the stateful hooks only of
        # components that have `_reset_stateful_cache` (diffusers' `CacheMixin`); DiT and PixArt models lack it, so
        # give this instance one: a call that stops before the schedule's last step then frees its cache (and
        # warns) at its end instead of holding it until the next call.
        setattr(model, _PIPELINE_RESET, _PipelineReset(controller))
    return controller


def remove_token_cache(model: torch.nn.Module) -> None:
    """Take the token cache off `model`: it is the original model again, with no hooks of ours left."""
    controller = _controller(model)
    if controller is None:
        raise RuntimeError("No token cache is applied to this model.")
    controller.reset()  # frees the cached tensors (the caller may still hold the controller); warns on a short run
    if isinstance(model.__dict__.get(_PIPELINE_RESET), _PipelineReset):
        del model.__dict__[_PIPELINE_RESET]
    _drop_hook(model, _TRAJECTORY_HOOK)
    for module in {id(u.module): u.module for u in find_units(model)}.values():
        _drop_hook(module, _UNIT_HOOK)
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

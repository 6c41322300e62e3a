"""The token cache's hooks: one on the transformer that tracks the step, one on each unit module.

Shape of `diffusers.hooks`: hook classes registered in each module instance's `HookRegistry`, sharing one
`TokenCacheController` (the state, with `reset()`); `diffsparse.cache.apply` puts them on and takes them off.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import StateManager

from diffsparse.backbones.registry import CROSS_ATTN, JOINT, ROPE_SELF, SELF_ATTN, SINGLE_STREAM, UnitInfo
from diffsparse.cache.attention import attention_with_signals
from diffsparse.cache.blend import blend_forward, blend_output, blend_text
from diffsparse.cache.conflicts import refuse_diffusers_caches
from diffsparse.cache.forecast import forecast, text_slot, update_history
from diffsparse.cache.kv import full_attention, partial_attention
from diffsparse.cache.rows import flat_rows, put_rows, take_rows
from diffsparse.cache.runners import (
    joint_attention,
    joint_text_entropy,
    rope_self_attention,
    single_stream_branch,
    single_stream_text_entropy,
)
from diffsparse.cache.selectors import ENTROPY
from diffsparse.cache.state import TokenCacheController, TrajectoryState
from diffsparse.model_hooks import find_hook

TRAJECTORY_HOOK = "diffsparse_token_cache_trajectory"
UNIT_HOOK = "diffsparse_token_cache_unit"
BLOCK_HOOK = "diffsparse_token_cache_block"


class _ContextReceiver(StateManager):
    """Receives the `CacheContext` that pipelines set with `transformer.cache_context(...)`."""

    def __init__(self):
        super().__init__(TrajectoryState)
        self.latest = None

    def set_context(self, context) -> None:
        super().set_context(context)
        self.latest = context


class TrajectoryHook(ModelHook):
    """On the transformer itself: before each forward, tells the controller which step this is. A trajectory
    refuses to start while a diffusers cache is on the model too (`diffsparse.cache.conflicts`)."""

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
            if self.controller.current.step == 0:
                try:
                    refuse_diffusers_caches(module, "The token cache cannot run")
                except RuntimeError:
                    self.controller.current.reset()  # nothing of the refused trajectory is kept
                    raise
        return args, kwargs

    def post_forward(self, module, output):
        if not self.controller.paused:
            self.controller.end_forward()
        return output

    def reset_state(self, module):
        self.controller.reset()
        return module


def cached_output(ctl: TokenCacheController, u: UnitInfo, x: torch.Tensor, key: int | None = None) -> torch.Tensor:
    """Unit `u`'s cached output (B, N, D) (`key`: another of its slots, as `forecast.text_slot`; default its own),
    checked against its input `x` (B, N, ...) at this step."""
    state = ctl.current
    cache = state.cache.get(u.index if key is None else key)
    if cache is None or cache.shape[0] != x.shape[0] or cache.shape[1] != x.shape[1]:
        raise RuntimeError(
            f"Unit {u.name} has no cached output for this batch at step {state.step}: a trajectory must start "
            "with a full step. Call reset_token_cache(model) before sampling with a new batch size or resolution."
        )
    return cache


def stale_output(ctl: TokenCacheController, u: UnitInfo, x: torch.Tensor, key: int | None = None) -> torch.Tensor:
    """Unit `u`'s output at this step for tokens it does not recompute: copied, or forecast from their history
    (`key`: another of its slots, e.g. a FLUX single-stream block's text rows, reused as its image tokens are)."""
    cache = cached_output(ctl, u, x, key)
    if ctl.forecasting(ctl.current.step, u.index):
        return forecast(ctl.current, u.index if key is None else key, ctl.current.step, ctl.forecast_order)
    return cache


class TokenCacheBlockHook(ModelHook):
    """On a block whose backbone row says how to run less of it (`BlockList`): at a step where each of its units
    reuses all its tokens, its output put together from theirs (`reused`), without running the block; at a step
    where its MLP unit recomputes some tokens, the block with the MLP's norm and modulation on those tokens only
    (`fresh_mlp`, given `mlp`: the MLP unit's hook, whose selector reads no token values). Elsewhere, and in
    training mode, the block runs as usual (its units' hooks do the rest)."""

    def __init__(self, controller: TokenCacheController, block: int, units: dict, blocks, signature, mlp=None):
        super().__init__()
        self.controller = controller
        self.block = block
        self.units = units  # the unit's name in the block (`attn1`, `ff`) -> its UnitInfo
        self.reused = blocks.reused
        self.fresh_mlp = blocks.fresh_mlp if mlp is not None else None
        self.mlp = mlp
        self.signature = signature

    def new_forward(self, module, *args, **kwargs):
        ctl = self.controller
        state = ctl.current
        original = self.fn_ref.original_forward
        if state is None or ctl.paused or ctl.choice is not None:
            return original(*args, **kwargs)
        if self.reused is not None and ctl.block_reused(state.step, self.block):
            inputs = self.signature.bind(*args, **kwargs).arguments
            x = inputs["hidden_states"]
            out = self.reused(module, x, {name: stale_output(ctl, u, x) for name, u in self.units.items()}, inputs)
        elif self.fresh_mlp is not None and 0.0 < ctl.sparsity(state.step, self.mlp.unit.index) < 1.0:
            inputs = self.signature.bind(*args, **kwargs).arguments
            out = self.fresh_mlp(module, inputs["hidden_states"], inputs, self.mlp.fresh_rows)
        else:
            return original(*args, **kwargs)
        return original(*args, **kwargs) if out is None else out


class TokenCacheUnitHook(ModelHook):
    """On one unit's module: compute all, reuse all, or recompute the top-k tokens; reused tokens are copied or
    forecast (`diffsparse.cache.forecast`) as the schedule says.

    A FLUX joint attention module carries two units (its image and its text stream); every other module one.
    """

    def __init__(self, controller: TokenCacheController, units: list[UnitInfo], signature: inspect.Signature):
        super().__init__()
        self.controller = controller
        self.units = units
        self.unit = units[0]
        self.signature = signature
        self.compute = None  # the unit's computation when compiled (`TokenCacheConfig.compile_units`)

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
    def _store_full(self, u: UnitInfo, x: torch.Tensor, out: torch.Tensor, context: int = 0) -> None:
        """Record `u`'s output `out` on all its tokens (and its forecast history, if it keeps one)."""
        ctl = self.controller
        if ctl.history[u.index]:
            update_history(ctl.current, u.index, out, None, None, ctl.forecast_order, ctl.forecast_dtype)
        ctl.current.store_full(u.index, out, x, ctl.selector.needs_inputs, context)

    def _store_text(self, u: UnitInfo, txt: torch.Tensor, branch: torch.Tensor) -> None:
        """Record the text branch of single-stream block `u`, computed on all its rows (`stale_output` reuses it)."""
        ctl, key = self.controller, text_slot(u.index)
        if ctl.history[u.index]:
            update_history(ctl.current, key, branch, None, None, ctl.forecast_order, ctl.forecast_dtype)
        ctl.current.store_full(key, branch, txt, False)

    def _choose(self, u: UnitInfo, x: torch.Tensor, s: float):
        """The fresh tokens of `u` at sparsity `s` < 1: `(idx (B, k), rows)`; rows None when all are fresh."""
        ctl, state = self.controller, self.controller.current
        b, n = x.shape[:2]
        if s == 0.0:
            return torch.arange(n, device=x.device).expand(b, n), None
        cached_output(ctl, u, x)
        idx = ctl.selector.select(x, ctl.fresh(state.step, u.index, n), state, u)
        return idx, flat_rows(idx, n)

    def _store(self, u: UnitInfo, x: torch.Tensor, out: torch.Tensor, chosen, context: int = 0) -> torch.Tensor:
        """Record the fresh outputs `out` of `u` (input `x`; `context`: its key/value tokens outside `x`); returns
        its full output (B, N, D): the fresh tokens, and the others copied or forecast."""
        ctl = self.controller
        state, keep = ctl.current, ctl.selector.needs_inputs
        idx, rows = chosen
        if rows is None:
            self._store_full(u, x, out, context)
            return out
        if ctl.history[u.index]:
            update_history(state, u.index, out, rows, idx, ctl.forecast_order, ctl.forecast_dtype)
        cache = put_rows(state.cache[u.index], rows, out, state.in_place)
        state.store_partial(u.index, cache, idx, rows, take_rows(x, rows, idx.shape[1]) if keep else None, keep)
        if ctl.forecasting(state.step, u.index):  # fresh tokens were computed at this step: their forecast is exact
            return forecast(state, u.index, state.step, ctl.forecast_order)
        return cache

    def fresh_rows(self, stream: torch.Tensor, prepare) -> torch.Tensor:
        """This MLP unit's output (B, N, D) at a partial step, for its block's runner (`BlockList.fresh_mlp`): the
        fresh tokens chosen on `stream` (B, N, D), the block's residual stream (the selector reads no token
        values), and computed from `prepare(their rows)`, the MLP's input on those rows only. It calls the MLP's
        forward itself, so hooks registered on the MLP module (not on its layers) do not see these steps."""
        u, ctl = self.unit, self.controller
        chosen = self._choose(u, stream, ctl.sparsity(ctl.current.step, u.index))
        fresh = prepare(take_rows(stream, chosen[1], chosen[0].shape[1]))
        return self._store(u, stream, (self.compute or self.fn_ref.original_forward)(fresh), chosen)

    # --- runners --------------------------------------------------------------------------------------------------
    def _one(self, module, hidden_states, *args, **kwargs):
        """A unit on one module whose first argument is its tokens (`MODULE` and `ROPE_SELF` runners)."""
        ctl, u = self.controller, self.unit
        state = ctl.current
        original = self.compute or self.fn_ref.original_forward
        if ctl.choice is not None:
            return blend_forward(self, module, hidden_states, *args, **kwargs)
        s = ctl.sparsity(state.step, u.index)
        if s == 0.0:
            signal = ctl.signal_plan[state.step][u.index]
            keep_kv = ctl.kv_plan[state.step][u.index]  # reuse_kv: keep the keys and values for later partial steps
            if keep_kv:
                _no_mask(u, args, kwargs)
            if signal is None and not keep_kv:
                out = original(hidden_states, *args, **kwargs)
            elif signal is None:
                out, state.kv[u.index] = full_attention(module, hidden_states)
            else:
                context = hidden_states if u.kind == SELF_ATTN else kwargs["encoder_hidden_states"]
                mask = kwargs.get("attention_mask")
                kv = (module.to_k(hidden_states), module.to_v(hidden_states)) if keep_kv else None
                out, state.signals[(u.block, signal)] = attention_with_signals(
                    module, hidden_states, context, mask, signal, kv
                )
                if keep_kv:
                    state.kv[u.index] = kv
            self._store_full(u, hidden_states, out, _text_tokens(u, args, kwargs))
            return out
        if s == 1.0:
            return stale_output(ctl, u, hidden_states)
        return self._partial(module, hidden_states, s, args, kwargs)

    def _partial(self, module, hidden_states, s, args, kwargs):
        """`_one` at sparsity 0 < s < 1: choose the fresh tokens, compute them, store them, return the whole
        output. Tensor work only (no host-device synchronisation): it compiles with `fullgraph=True`."""
        u, state = self.unit, self.controller.current
        original = self.compute or self.fn_ref.original_forward
        chosen = self._choose(u, hidden_states, s)
        if u.index in state.kv:  # reuse_kv: keys and values of the reused tokens from the cache
            _no_mask(u, args, kwargs)
            k = chosen[0].shape[1]
            out_fresh, state.kv[u.index] = partial_attention(module, hidden_states, chosen[1], k, state.kv[u.index],
                                                             state.in_place)  # fmt: skip
        elif u.runner == ROPE_SELF:
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
            if ctl.signal_plan[state.step][img_u.index] is not None:  # the selector reads it at later partial steps
                with torch.no_grad():
                    entropy = joint_text_entropy(module, img, txt, bound["image_rotary_emb"])
                state.signals[(img_u.block, ENTROPY)] = entropy
            out = self.fn_ref.original_forward(*args, **kwargs)
            if len(out) != 2:
                raise ValueError(f"{img_u.name}: image-prompt adapters are not supported by the token cache.")
            n_img, n_txt = img.shape[1], txt.shape[1]
            if ctl.choice is not None:
                return blend_output(ctl, img_u, img, out[0], n_txt), blend_output(ctl, txt_u, txt, out[1], n_img)
            self._store_full(img_u, img, out[0], n_txt)
            self._store_full(txt_u, txt, out[1], n_img)
            return out
        if bound.get("attention_mask") is not None or bound.get("kwargs"):
            raise ValueError(f"{img_u.name}: attention masks and extra attention arguments are not supported.")
        chosen = []
        for u, x in ((img_u, img), (txt_u, txt)):
            s = ctl.sparsity(state.step, u.index)
            chosen.append(None if s == 1.0 else self._choose(u, x, s))
        if chosen == [None, None]:
            return stale_output(ctl, img_u, img), stale_output(ctl, txt_u, txt)
        fresh = joint_attention(module, img, txt, *chosen, bound["image_rotary_emb"])
        return tuple(
            stale_output(ctl, u, x) if c is None else self._store(u, x, f, c, other.shape[1])
            for u, x, other, f, c in zip((img_u, txt_u), (img, txt), (txt, img), fresh, chosen, strict=True)
        )

    def _single_stream(self, block, args, kwargs):
        """FLUX single-stream block: its residual branch cached per image token. The text rows are computed
        whenever any image token is (they are keys and values of every query), and reused with the image tokens
        at a step that reuses all of those: then the block does no work at all."""
        ctl, u = self.controller, self.unit
        state = ctl.current
        bound = self.signature.bind(*args, **kwargs).arguments
        img, txt = bound["hidden_states"], bound["encoder_hidden_states"]
        s = ctl.sparsity(state.step, u.index)
        if ctl.choice is not None or s == 0.0:
            if ctl.signal_plan[state.step][u.index] is not None:  # the selector reads it at later partial steps
                with torch.no_grad():
                    entropy = single_stream_text_entropy(block, img, txt, bound["temb"], bound["image_rotary_emb"])
                state.signals[(u.block, ENTROPY)] = entropy
            txt_out, img_out = self.fn_ref.original_forward(*args, **kwargs)
            if ctl.choice is not None:
                txt_branch = blend_text(ctl, u, txt, txt_out - txt)
                return txt + txt_branch, img + blend_output(ctl, u, img, img_out - img, txt.shape[1])
            self._store_text(u, txt, txt_out - txt)
            self._store_full(u, img, img_out - img, txt.shape[1])
            return txt_out, img_out
        if bound.get("joint_attention_kwargs"):
            raise ValueError(f"{u.name}: extra attention arguments are not supported.")
        if s == 1.0:
            return txt + stale_output(ctl, u, txt, text_slot(u.index)), img + stale_output(ctl, u, img)
        chosen = self._choose(u, img, s)
        rotary = bound["image_rotary_emb"]
        txt_branch, img_branch = single_stream_branch(block, img, txt, bound["temb"], rotary, chosen)
        self._store_text(u, txt, txt_branch)
        return txt + txt_branch, img + self._store(u, img, img_branch, chosen, txt.shape[1])


def _no_mask(u: UnitInfo, args: tuple, kwargs: dict) -> None:
    """Refuse an attention mask (diffusers `Attention`'s third argument) where the unit computes attention itself
    (`cache.kv`)."""
    if kwargs.get("attention_mask", args[1] if len(args) > 1 else None) is not None:
        raise ValueError(f"{u.name}: attention masks are not supported with reuse_kv=True.")


def _text_tokens(u: UnitInfo, args: tuple, kwargs: dict) -> int:
    """The key/value tokens of a cross-attention unit (its `encoder_hidden_states`, the attention's second
    argument); 0 for other units, whose MACs do not depend on them."""
    if u.kind != CROSS_ATTN:
        return 0
    text = kwargs.get("encoder_hidden_states", args[0] if args else None)
    return 0 if text is None else text.shape[1]


class PipelineReset:
    """`model._reset_stateful_cache(recurse=True)` (the signature of diffusers' `CacheMixin`) for models without it:
    frees the token cache at the end of a pipeline call."""

    def __init__(self, controller: TokenCacheController):
        self.controller = controller

    def __call__(self, recurse: bool = True) -> None:
        self.controller.reset()


def token_cache_controller(model: torch.nn.Module) -> TokenCacheController | None:
    """The controller of the token cache applied to `model`, or None."""
    hook = find_hook(model, TRAJECTORY_HOOK)
    return hook.controller if hook is not None else None

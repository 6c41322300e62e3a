"""Training mode of a unit: compute every token, then blend with the cache through the nested candidate masks.

At step t > 0 a unit with soft choice `h` over the actions (|S| levels with copy, or all of `levels.ACTIONS`: one-hot
in value, differentiable through the straight-through estimator) returns

    m * f + c * cache + p * forecast,    m_i = sum_a h_a [rank_i < fresh(a)],
                                         c_i = sum_{copy a} h_a [rank_i >= fresh(a)],
                                         p_i = sum_{forecast a} h_a [rank_i >= fresh(a)],

where f is the unit on all tokens, `forecast` the Taylor step of the reused tokens (`cache.forecast`) and rank_i
token i's place in the selector's ranking. With a one-hot h this is exactly the inference result (the top fresh(a)
tokens recomputed, the rest copied or forecast; self-attention over all current tokens), and the loss is
differentiable in h. It costs a dense forward per step: this mode is for learning schedules, not for speed.
"""

from __future__ import annotations

import torch

from diffsparse.backbones.registry import SELF_ATTN
from diffsparse.cache.attention import attention_with_signals
from diffsparse.cache.forecast import blend_history, forecast, text_slot
from diffsparse.levels import ACTIONS, FORECAST, fresh_tokens


def token_ranks(score: torch.Tensor, cfg: bool) -> torch.Tensor:
    """Rank (0 = recomputed first) of every token `(B, N)`; CFG halves share the ranking of their summed scores."""
    if cfg:
        half = score.shape[0] // 2
        score = (score[:half] + score[half:]).repeat(2, 1)
    return score.argsort(dim=1, descending=True, stable=True).argsort(dim=1)


def _scores(ctl, state, unit, x: torch.Tensor) -> torch.Tensor:
    """The selector's scores, called exactly where the inference path calls it (partial levels), so a random
    selector draws the same stream. At levels 0 and 1 the ranking only shapes the gradient: use the selector where
    that has no side effects (`side_effects`) and its signals exist, else the steps since each token was last
    computed."""
    selector = ctl.selector
    s = ctl.sparsity(state.step, unit.index)
    has_signals = all((unit.block, sig) in state.signals for sig in selector.signals)
    if 0.0 < s < 1.0 or (not selector.side_effects and has_signals):
        return selector.score(x, state, unit)
    return (state.step - state.last_fresh[unit.index]).float()


def blend_forward(hook, module, hidden_states, *args, **kwargs):
    """The unit's output in training mode (see the module docstring); updates the trajectory's cache."""
    ctl, u = hook.controller, hook.unit
    state = ctl.current
    original = hook.fn_ref.original_forward
    signal = ctl.signal_plan[state.step][u.index]
    if signal is not None:  # the selector reads this attention map at later partial steps
        context = hidden_states if u.kind == SELF_ATTN else kwargs["encoder_hidden_states"]
        with torch.no_grad():
            _, state.signals[(u.block, signal)] = attention_with_signals(
                module, hidden_states, context, kwargs.get("attention_mask"), signal
            )
    text = kwargs.get("encoder_hidden_states")
    context = 0 if text is None else text.shape[1]
    return blend_output(ctl, u, hidden_states, original(hidden_states, *args, **kwargs), context)


def blend_output(ctl, u, x: torch.Tensor, out: torch.Tensor, context: int = 0) -> torch.Tensor:
    """Unit `u`'s output `out` (B, N, D), computed on all tokens of its input `x`, blended with its cache through
    the choice's nested masks; updates the trajectory's cache. `context`: its key/value tokens outside `x`."""
    state = ctl.current
    if state.step == 0:
        state.store_full(u.index, out, x.detach(), ctl.selector.needs_inputs, context)
        return out
    n = x.shape[1]
    h = ctl.choice[state.step, u.index].to(out.dtype)  # (|A|,): the first |S| actions are the levels with copy
    actions = ACTIONS[: len(h)]
    with torch.no_grad():
        ranks = token_ranks(_scores(ctl, state, u, x.detach()), state.cfg)
        counts = torch.tensor([fresh_tokens(s, n) for s, _ in actions], device=ranks.device)
        candidates = (ranks[..., None] < counts).to(out.dtype)  # (B, N, |A|) nested masks
        forecasts = torch.tensor([mode == FORECAST for _, mode in actions], device=ranks.device, dtype=out.dtype)
    m = (candidates * h).sum(-1, keepdim=True)  # (B, N, 1)
    cache = state.cache[u.index]
    stale = (1 - candidates) * h
    copied = (stale * (1 - forecasts)).sum(-1, keepdim=True)
    blended = m * out + copied * cache
    if forecasts.any():
        predicted = forecast(state, u.index, state.step, ctl.forecast_order)
        blended = blended + (stale * forecasts).sum(-1, keepdim=True) * predicted
    fresh = ranks < fresh_tokens(ctl.sparsity(state.step, u.index), n)
    if ctl.history[u.index]:
        blend_history(state, u.index, out, fresh, ctl.forecast_order, ctl.forecast_dtype)
    state.cache[u.index] = m * out + (1 - m) * cache  # the last computed outputs, differentiable in the choice
    state.last_fresh[u.index] = torch.where(fresh, state.step, state.last_fresh[u.index])
    state.full_at.pop(u.index, None)
    if ctl.selector.needs_inputs:
        state.inputs[u.index] = torch.where(fresh[..., None], x.detach(), state.inputs[u.index])
    return blended


def blend_text(ctl, u, txt: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """Training mode for the text rows of FLUX single-stream block `u`: its text `branch` (B, M, D), computed,
    blended with the reused one (copied or forecast) by the weight of the actions that reuse all image tokens,
    the only ones where inference reuses the text (`hooks.stale_output` on its text slot); updates the text's cache."""
    state, key = ctl.current, text_slot(u.index)
    if state.step == 0:
        state.store_full(key, branch, txt, False)
        return branch
    h = ctl.choice[state.step, u.index].to(branch.dtype)
    actions = ACTIONS[: len(h)]
    reuse = torch.tensor([s == 1.0 for s, _ in actions], device=h.device, dtype=h.dtype)
    forecasts = torch.tensor([mode == FORECAST for _, mode in actions], device=h.device, dtype=h.dtype)
    computed = (h * (1 - reuse)).sum()
    cache = state.cache[key]
    blended = computed * branch + (h * reuse * (1 - forecasts)).sum() * cache
    if forecasts.any():
        blended = blended + (h * reuse * forecasts).sum() * forecast(state, key, state.step, ctl.forecast_order)
    fresh = torch.full(txt.shape[:2], ctl.sparsity(state.step, u.index) < 1.0, device=txt.device)
    if ctl.history[u.index]:
        blend_history(state, key, branch, fresh, ctl.forecast_order, ctl.forecast_dtype)
    state.cache[key] = computed * branch + (1 - computed) * cache
    state.last_fresh[key] = torch.where(fresh, state.step, state.last_fresh[key])
    state.full_at.pop(key, None)
    return blended

"""Forecasting reused tokens: a Taylor step in the denoising-step index from each token's last computations.

For a unit that forecasts, every token keeps its last computed output f0 (the cache, computed at step t0 =
`last_fresh`) and divided differences of its history in `TrajectoryState.factors`: the first
d1 = (f0 - f1) / (t0 - t1) and, at order 2, the second d2 = (d1 - d1') / (t0 - t2) (Newton's form, with the step of
the computation before, t1 = `prev_fresh`). At step t a reused token is forecast as

    f(t) = f0 + d1 (t - t0) [+ d2 (t - t0)(t - t1)],

per token, so partial steps (some tokens fresh, the rest forecast) and whole-unit forecasts both work. A token
computed only once has d1 = 0 (its forecast is its copy). Fresh tokens update their own history; the factors are
kept in `FORECAST_DTYPE` (an option: the model's dtype halves their memory). Order 1 with float32 factors is
diffusers' TaylorSeer with `max_order=1` on a per-token schedule (`tests/test_forecast.py` checks the two agree).
"""

from __future__ import annotations

import torch

from diffsparse.cache.rows import put_rows, take_rows

FORECAST_ORDERS = (1, 2)


def text_slot(unit: int) -> int:
    """The key under which the trajectory state keeps the text rows of unit `unit` (a FLUX single-stream block's
    text branch, reused with its image tokens when the block reuses all of them): a negative number, kept apart
    from the units' own keys."""
    return -1 - unit


def forecast(state, unit: int, step: int, order: int) -> torch.Tensor:
    """Unit `unit`'s output (B, N, D) at `step` forecast from its history, in the cache's dtype."""
    cache = state.cache[unit]
    factors = state.factors.get(unit)
    if factors is None:  # computed once so far: nothing to extrapolate from
        return cache
    since = state.full_at.get(unit)
    if since is not None and len(factors) == 1 and factors[0].dtype == cache.dtype:
        # every token was last computed at step `since`: one fused multiply-add, the step difference a Python int
        return torch.add(cache, factors[0], alpha=step - since)
    dtype = torch.promote_types(cache.dtype, factors[0].dtype)  # fresh rows come back exactly
    dt = (step - state.last_fresh[unit]).unsqueeze(-1).to(dtype)
    out = cache.to(dtype) + factors[0] * dt
    if order >= 2 and len(factors) > 1:
        out = out + factors[1] * (dt * (step - state.prev_fresh[unit]).unsqueeze(-1).to(dt.dtype))
    return out.to(cache.dtype)


def update_history(state, unit: int, fresh: torch.Tensor, rows, idx, order: int, dtype) -> None:
    """Before the cache takes `fresh` (B, k, D), the new outputs of tokens `idx` (B, k) (`rows`: their rows in the
    (B * N, D) view; None when all tokens are fresh), update their divided differences. The first computation of
    a unit starts every token's first difference at 0."""
    cache = state.cache.get(unit)
    dtype = dtype or fresh.dtype
    if cache is None:
        return
    if rows is None and cache.shape != fresh.shape:  # a new batch or resolution at a full step: start afresh
        state.factors.pop(unit, None)
        state.prev_fresh.pop(unit, None)
        return
    step = state.step
    since = state.full_at.get(unit)
    if rows is None and order == 1 and since is not None and fresh.dtype == cache.dtype == dtype:
        # a full compute after a full compute: every token's step difference is step - since (a Python int)
        state.factors[unit] = [torch.sub(fresh, cache).div_(step - since)]
        return
    old = cache if rows is None else take_rows(cache, rows, idx.shape[1])
    t0 = state.last_fresh[unit] if rows is None else state.last_fresh[unit].gather(1, idx)
    dt0 = (step - t0).unsqueeze(-1).to(dtype)
    d1 = (fresh.to(dtype) - old.to(dtype)) / dt0
    factors = state.factors.get(unit)
    if factors is None:
        factors = [torch.zeros(cache.shape, dtype=dtype, device=cache.device)]
        if order >= 2:
            factors.append(torch.zeros_like(factors[0]))
            state.prev_fresh[unit] = state.last_fresh[unit].clone()
    new = [d1]
    if order >= 2:
        t1 = state.prev_fresh[unit] if rows is None else state.prev_fresh[unit].gather(1, idx)
        seen = (t1 < t0).unsqueeze(-1)  # tokens computed twice before: a second difference exists
        old_d1 = factors[0] if rows is None else take_rows(factors[0], rows, idx.shape[1])
        d2 = (d1 - old_d1) / (step - t1).unsqueeze(-1).to(dtype).clamp(min=1)
        new.append(torch.where(seen, d2, torch.zeros_like(d2)))
        state.prev_fresh[unit] = t0 if rows is None else state.prev_fresh[unit].scatter(1, idx, t0)
    if rows is None:
        state.factors[unit] = new
    else:
        state.factors[unit] = [put_rows(f, rows, n, state.in_place) for f, n in zip(factors, new, strict=True)]


def blend_history(state, unit: int, out: torch.Tensor, fresh_mask: torch.Tensor, order: int, dtype) -> None:
    """Training mode's `update_history`: every token was computed (`out`), those of `fresh_mask` (B, N) count as
    fresh (the others keep their history). Differentiable in `out`."""
    cache = state.cache[unit]
    dtype = dtype or out.dtype
    step = state.step
    t0 = state.last_fresh[unit]
    dt0 = (step - t0).unsqueeze(-1).to(dtype).clamp(min=1)
    d1 = (out.to(dtype) - cache.to(dtype)) / dt0
    factors = state.factors.get(unit) or [torch.zeros(cache.shape, dtype=dtype, device=cache.device)]
    keep = ~fresh_mask.unsqueeze(-1)
    new = [torch.where(keep, factors[0], d1)]
    if order >= 2:
        prev = state.prev_fresh.get(unit, t0)
        old_d2 = factors[1] if len(factors) > 1 else torch.zeros_like(d1)
        d2 = (d1 - factors[0]) / (step - prev).unsqueeze(-1).to(dtype).clamp(min=1)
        d2 = torch.where((prev < t0).unsqueeze(-1), d2, torch.zeros_like(d2))
        new.append(torch.where(keep, old_d2, d2))
        state.prev_fresh[unit] = torch.where(fresh_mask, t0, prev)
    state.factors[unit] = new


def factor_bytes(state) -> dict[int, int]:
    """The forecast's extra memory per unit (bytes of its factors and step records), for this trajectory."""
    sizes = {}
    for key, factors in state.factors.items():
        extra = sum(f.numel() * f.element_size() for f in factors)
        if key in state.prev_fresh:
            extra += state.prev_fresh[key].numel() * state.prev_fresh[key].element_size()
        unit = key if key >= 0 else text_slot(key)  # a text slot's memory is its unit's
        sizes[unit] = sizes.get(unit, 0) + extra
    return sizes

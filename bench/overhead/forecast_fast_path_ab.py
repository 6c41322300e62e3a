"""The forecast's fast path (one fused multiply-add when every token was last computed at the same step) against
the per-token path, alternated with dense in one process (forecast-FORA at 0.5, reference model, 20 samples, 1
warm-up and 7 rounds); also checks the two give the same samples.

Usage: python bench/overhead/forecast_fast_path_ab.py
"""

import torch
from case import GUIDANCE, STEPS, classes, fitted, model, noise, ref

import diffsparse.cache.hooks as H
from diffsparse.cache import apply_token_cache, remove_token_cache
from diffsparse.evaluate.timing import alternate
from diffsparse.models.sampling import sample

s = fitted["forecast_fora"]
fast_fc, fast_up = H.forecast, H.update_history


def without_fast_path(fn):
    """`fn` (forecast or update_history) with the unit's `full_at` hidden, so it takes the per-token path."""

    def call(state, unit, *args):
        saved = state.full_at.pop(unit, None)
        try:
            return fn(state, unit, *args)
        finally:
            if saved is not None:
                state.full_at[unit] = saved

    return call


slow_fc, slow_up = without_fast_path(fast_fc), without_fast_path(fast_up)
outs = {}


def run(fast):
    def r(clock):
        H.forecast, H.update_history = (fast_fc, fast_up) if fast else (slow_fc, slow_up)
        if fast is not None:
            apply_token_cache(model, s, selector="toca")
        with torch.no_grad(), clock:
            x = sample(model, ref.scheduler("ddim"), classes, noise, STEPS, GUIDANCE)
        if fast is not None:
            remove_token_cache(model)
        outs[fast] = x

    return r


t = alternate({"dense": run(None), "slow": run(False), "fast": run(True)}, rounds=7)
for k in ("slow", "fast"):
    sp = t.speedup(k)
    print(k, f"{sp.median:.3f}x ({sp.low:.3f}-{sp.high:.3f})", f"{t.median_seconds(k):.3f}s")
print("dense", f"{t.median_seconds('dense'):.3f}s", "max |fast - slow|", float((outs[True] - outs[False]).abs().max()))

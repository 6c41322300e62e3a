"""`token_cache_summary`: what the token cache did in its last trajectory."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from diffsparse.accounting.macs import unit_macs
from diffsparse.cache.hooks import token_cache_controller
from diffsparse.levels import fresh_tokens


@dataclass(frozen=True)
class TokenCacheSummary:
    """What the token cache did in one trajectory.

    Attributes:
        steps: the denoising steps it ran (0: none yet).
        fresh_tokens: per step, the tokens recomputed, summed over the units (per sample).
        total_tokens: the tokens of all units in one step, what a dense step computes (per sample).
        fresh_fraction: the mean over the steps of `fresh_tokens / total_tokens` (1.0 is dense); None before a step.
        macs_saved: multiply-accumulates the units skipped over the trajectory, for its batch; None if unknown.
        unit_macs_dense: what the units would have spent dense; None if unknown. MACs outside the units (embeddings,
            norms, final layer) are the same either way and are not counted here (see `Schedule.macs`).
        context: the pipeline's cache context of the trajectory (`"cond"`, `"uncond"`) or `"default"`.
        forecast_bytes: unit name -> the extra memory its forecast history held (bytes; units that forecast only).
    """

    steps: int
    fresh_tokens: list[int]
    total_tokens: int
    fresh_fraction: float | None
    macs_saved: int | None
    unit_macs_dense: int | None
    context: str
    forecast_bytes: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.steps:
            return "token cache: no trajectory has run yet"
        text = f"token cache ({self.context}): {self.steps} steps, "
        text += f"{100 * self.fresh_fraction:.1f}% of tokens recomputed"
        if self.macs_saved is not None and self.unit_macs_dense:
            share = 100 * self.macs_saved / self.unit_macs_dense
            text += f", {self.macs_saved / 1e9:.3g} GMACs saved ({share:.1f}% of the units')"
        if self.forecast_bytes:
            text += f", forecast history {sum(self.forecast_bytes.values()) / 2**20:.3g} MiB"
        return text


def token_cache_summary(model: torch.nn.Module) -> TokenCacheSummary:
    """What the token cache on `model` did in its last trajectory (or the one running now): steps run, fresh
    tokens per step, MACs saved in the units.

    Example:
        >>> images = pipe(class_labels=[207, 360], num_inference_steps=20).images
        >>> print(token_cache_summary(pipe.transformer))
        token cache (default): 20 steps, 53.1% of tokens recomputed, 12.3 GMACs saved (46.2% of the units')
    """
    controller = token_cache_controller(model)
    if controller is None:
        raise RuntimeError("No token cache is applied to this model: apply_token_cache(model, schedule) first.")
    state = controller.current
    record = controller.record(state) if state is not None and state.step >= 0 else controller.last_trajectory
    if record is None or not record.steps:
        return TokenCacheSummary(0, [], 0, None, None, None, "default")
    units = [u for u in controller.units if u.index in record.shapes]
    fresh = [sum(fresh_tokens(row[u.index], record.shapes[u.index][1]) for u in units) for row in record.plan]
    total = sum(record.shapes[u.index][1] for u in units)
    dense = saved = 0
    for u in units:
        b, n, m = record.shapes[u.index]
        full, reuse_kv = unit_macs(u, n, n, m), controller.reuse_kv[u.index]
        levels = Counter(row[u.index] for row in record.plan)
        dense += b * full * record.steps
        saved += b * sum(c * (full - unit_macs(u, n, fresh_tokens(s, n), m, reuse_kv)) for s, c in levels.items())
    known = len(units) == len(controller.units)
    fraction = sum(fresh) / (total * record.steps) if total else None
    names = {u.index: u.name for u in controller.units}
    forecast_bytes = {names[i]: size for i, size in record.forecast_bytes.items()}
    return TokenCacheSummary(
        record.steps, fresh, total, fraction, saved if known else None, dense if known else None, record.context,
        forecast_bytes,
    )  # fmt: skip

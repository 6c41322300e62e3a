"""Hand-made schedules: the ways users allocate compute over the trajectory today, each set to a MAC budget.

Every family has a plain form with its own knob (`fora(..., interval=2)`), is registered as an allocator
(`allocate.registry`) with the knob settings that fit it, and is fitted to a budget by `budget_schedules`, which
sweeps the knob and keeps the schedule whose saved MAC fraction is closest to the budget. "Fewer steps" is a
sampling-loop setting, not a schedule: `fewer_steps`.

Sources of the shapes (our code, their published recipes):
- FORA (Selvaraju et al., 2024): reuse whole units, full step every N (N = 2 in DiffSparse's Table 1).
- Forecast-FORA: FORA's steps with the reused outputs forecast by a Taylor step (TaylorSeer, Liu et al., 2025:
  first order, from the last two full steps) instead of copied.
- ToCa (Zou et al., ICLR 2025): full step every N, a fixed fresh-token ratio per module type in between, and a
  ratio that ramps along the trajectory (its DiT recipe: 50 DDIM steps, fresh ratio 0.07, ramped, N = 3-4).
- DuCa (Zou et al., 2024): ToCa steps alternating with aggressive steps that reuse everything; norm or random
  token selection (pass `selector="norm"` at runtime).
- MosaicDiff (`shared/papers/mosaicdiff.md`): three stages from the noise schedule, sparsity high-low-high;
  the paper's DiT boundaries are train timesteps 900 and 450 (its Table 2).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

from diffsparse.accounting.macs import MacTable
from diffsparse.allocate.registry import ALLOCATORS, Knob, register_allocator
from diffsparse.allocate.solver import check_budget
from diffsparse.allocate.units import unit_kinds
from diffsparse.backbones.registry import CROSS_ATTN, JOINT_ATTN, MLP, PARALLEL_BLOCK, SELF_ATTN
from diffsparse.levels import SPARSITY_LEVELS
from diffsparse.schedule import Schedule

LEVELS = np.array(SPARSITY_LEVELS)
# MosaicDiff's DiT stages are cut "at step T=450 and T=900" (its appendix Table 2). Read in sampling order on the
# 1000-step schedule, that is train timesteps 550 and 100: the stages then hold 45 %, 45 % and 10 % of the steps,
# each Table 2 row's stage sparsities average to its overall sparsity (0.298 for 0.30), and our reading of its
# eq. 6 (`snr_stage_boundaries`) gives (581, 108) for DiT's linear schedule. (Read as train timesteps 900 and 450,
# Table 2 would average to 0.12.) Stage 1 is t >= 550, stage 2 is 100 <= t < 550, stage 3 is t < 100.
MOSAICDIFF_DIT_BOUNDARIES = (550, 100)
# ToCa's module weights on the fresh ratio: attention recomputes twice the share of the MLPs (FLUX's joint
# attention is attention too). A FLUX single-stream block is attention and MLP in one unit, mostly MLP in MACs: it
# keeps the MLP's weight.
TOCA_KIND_WEIGHTS = {SELF_ATTN: 2.0, JOINT_ATTN: 2.0, CROSS_ATTN: 1.0, MLP: 1.0, PARALLEL_BLOCK: 1.0}
# The knob settings swept to fit a family to a budget, in the order tried (the first of equally close ones wins).
FRESH_RATIOS = [{"fresh_ratio": r} for r in np.linspace(0.0, 1.0, 201)]
UNIFORM_SPARSITIES = [{"sparsity": s} for s in np.linspace(0, 1, 401)]
STAGE_SPARSITIES = [
    {"sparsities": s} for s in itertools.product(SPARSITY_LEVELS, repeat=3) if s[1] <= min(s[0], s[2]) and s[0] >= s[2]
]


def _nearest_level(sparsity: np.ndarray) -> np.ndarray:
    return LEVELS[np.abs(np.asarray(sparsity)[..., None] - LEVELS).argmin(-1)]


def fewer_steps(num_steps: int, budget: float) -> int:
    """The step count that saves `budget` of the MACs of `num_steps` dense steps (same sampler)."""
    if not 0.0 <= budget < 1.0:
        raise ValueError(f"budget must be in [0, 1), got {budget}")
    return max(1, round(num_steps * (1.0 - budget)))


@register_allocator("fora", fit=lambda num_steps: [{"interval": i} for i in range(1, num_steps + 1)])
def fora(units: Sequence[str], num_steps: int, interval: int = 2) -> Schedule:
    """A full step every `interval` steps; every unit reused whole in between."""
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    grid = np.ones((num_steps, len(units)))
    grid[::interval] = 0.0
    return Schedule(grid, units, {"method": "fora", "interval": interval})


@register_allocator("forecast_fora", fit=lambda num_steps: [{"interval": i} for i in range(1, num_steps + 1)])
def forecast_fora(units: Sequence[str], num_steps: int, interval: int = 2) -> Schedule:
    """A full step every `interval` steps; every unit's output forecast in between (TaylorSeer's shape)."""
    copy = fora(units, num_steps, interval)
    return copy.with_forecast(True, {"method": "forecast_fora"})


TAYLORSEER_WARMUP = 3  # diffusers' TaylorSeerCacheConfig.disable_cache_before_step default


@register_allocator("forecast_warmup", fit=lambda num_steps: [{"interval": i} for i in range(1, num_steps + 1)])
def forecast_warmup(
    units: Sequence[str], num_steps: int, interval: int = 2, warmup: int = TAYLORSEER_WARMUP
) -> Schedule:
    """TaylorSeer's shape on our runtime: the first `warmup` steps full, then a full step every `interval` steps
    in diffusers' phase (steps t >= warmup with (t - warmup - 1) % interval == 0), every unit forecast between.
    With its defaults it computes the steps diffusers' `apply_taylorseer_cache` computes."""
    if interval < 1 or warmup < 1:
        raise ValueError(f"interval and warmup must be >= 1, got interval={interval}, warmup={warmup}")
    steps = np.arange(num_steps)
    full = (steps < warmup) | ((steps - warmup - 1) % interval == 0)
    grid = np.where(full[:, None], 0.0, np.ones((num_steps, len(units))))
    meta = {"method": "forecast_warmup", "interval": interval, "warmup": warmup}
    return Schedule(grid, units, meta).with_forecast(True)


def _toca_rows(units: Sequence[str], num_steps: int, fresh_ratio: float, ramp: float, kind_weights: dict):
    """(T, U) sparsities of ToCa's partial steps: fresh ratio x module weight x a linear ramp along the steps."""
    weight_of = {**TOCA_KIND_WEIGHTS, **(kind_weights or {})}
    weights = np.array([weight_of[kind] for kind in unit_kinds(units)])
    along = 1.0 + ramp - 2.0 * ramp * np.arange(num_steps) / max(num_steps - 1, 1)  # 1 + ramp ... 1 - ramp
    fresh = np.clip(fresh_ratio * along[:, None] * weights[None], 0.0, 1.0)
    return _nearest_level(1.0 - fresh)


# toca-like (the bench's row): ToCa without a ramp, self-attention reuses 0.5, MLPs 0.75, full step every 3
@register_allocator("toca", fit=lambda _: FRESH_RATIOS,
                    presets={"toca-like": {"fresh_ratio": 0.25, "interval": 3, "ramp": 0.0}})  # fmt: skip
def toca(
    units: Sequence[str],
    num_steps: int,
    fresh_ratio: float = 0.25,
    interval: int = 3,
    ramp: float = 0.5,
    kind_weights: dict | None = None,
) -> Schedule:
    """ToCa: a full step every `interval` steps; in between each unit recomputes a fixed share of its tokens.

    The share is `fresh_ratio` x the module weight of the unit's kind (`TOCA_KIND_WEIGHTS`, kinds from the
    backbone registry) x a ramp that falls linearly from `1 + ramp` at the first step to `1 - ramp` at the last
    (more fresh tokens while the image is still forming).
    """
    if interval < 1:
        raise ValueError(f"interval must be >= 1 (a full step every `interval` steps), got {interval}")
    if not 0.0 <= fresh_ratio <= 1.0:
        raise ValueError(f"fresh_ratio must be in [0, 1] (the share of tokens recomputed), got {fresh_ratio}")
    if not 0.0 <= ramp < 1.0:
        raise ValueError(f"ramp must be in [0, 1) (the share changes from 1 + ramp to 1 - ramp), got {ramp}")
    grid = _toca_rows(units, num_steps, fresh_ratio, ramp, kind_weights)
    grid[::interval] = 0.0
    meta = {"method": "toca", "fresh_ratio": fresh_ratio, "interval": interval, "ramp": ramp}
    return Schedule(grid, units, meta)


@register_allocator("duca", fit=lambda _: FRESH_RATIOS, selector="norm")
def duca(
    units: Sequence[str],
    num_steps: int,
    fresh_ratio: float = 0.25,
    interval: int = 4,
    ramp: float = 0.5,
    kind_weights: dict | None = None,
) -> Schedule:
    """DuCa: full step every `interval`; after it, ToCa steps (odd offsets) alternate with reuse-all steps."""
    grid = toca(units, num_steps, fresh_ratio, interval, ramp, kind_weights).grid.copy()
    offset = np.arange(num_steps) % interval
    grid[(offset > 0) & (offset % 2 == 0)] = 1.0
    meta = {"method": "duca", "fresh_ratio": fresh_ratio, "interval": interval, "ramp": ramp}
    return Schedule(grid, units, meta)


@register_allocator("uniform", fit=lambda _: UNIFORM_SPARSITIES, knob=Knob("sparsity", 0.0, 1.0, 0.5))
def uniform(units: Sequence[str], num_steps: int, sparsity: float) -> Schedule:
    """Every unit reuses `sparsity` of its tokens at every step after the first.

    A sparsity between two levels of S alternates the two levels over the steps, spread evenly, so that the
    mean is `sparsity` (e.g. 0.6 = 0.5 on 60 % of the steps and 0.75 on 40 %).
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    grid = np.zeros((num_steps, len(units)))
    grid[1:] = alternated_levels(sparsity, num_steps - 1)[:, None]
    return Schedule(grid, units, {"method": "uniform", "sparsity": sparsity})


def alternated_levels(sparsity: float, n: int, centred: bool = False) -> np.ndarray:
    """n levels of S whose mean is `sparsity` as nearly as n allows: the two levels around it, the upper one
    spread evenly. Position i takes the upper level when the running count of upper positions falls behind
    `frac * (i + 1)` (`centred`: behind it by half a position, which starts the pattern half a period later)."""
    step = LEVELS[1] - LEVELS[0]
    low = min(int(sparsity / step + 1e-9), len(LEVELS) - 1)
    frac = sparsity / step - low
    shift = 0.5 if centred else 0.0
    upper = np.floor(frac * np.arange(1, n + 1) + shift) > np.floor(frac * np.arange(0, n) + shift)
    if frac <= 1e-9:
        upper[:] = False
    return LEVELS[np.minimum(low + upper, len(LEVELS) - 1)]


def snr_stage_boundaries(alphas_cumprod: Sequence[float], threshold: float = 0.55, data_power: float = 1.0):
    """MosaicDiff-style stage boundaries (train timesteps) from a noise schedule.

    The expected per-step change of the image MSE (the paper's eq. 6, with E||x0||^2 / d = `data_power`) is
    normalised to a maximum of 1; stage 2 (the fast-learning middle stage) is where it is >= `threshold`.
    The paper combines this score with the SNR in a way its text does not spell out, so this rule is our
    reading; `MOSAICDIFF_DIT_BOUNDARIES` are the paper's own numbers for DiT.
    Returns `(upper, lower)`: stage 1 is t >= upper, stage 2 is lower <= t < upper, stage 3 is t < lower.
    """
    a = np.asarray(alphas_cumprod, dtype=np.float64)
    delta = a[1:] - a[:-1]
    grad = (delta + 2.0 * (np.sqrt(a[:-1]) - np.sqrt(a[1:]))) * data_power - delta
    score = np.abs(grad) / np.abs(grad).max()
    middle = np.nonzero(score >= threshold)[0] + 1
    return int(middle.max()) + 1, int(middle.min())


@register_allocator("snr_stages", fit=lambda _: STAGE_SPARSITIES, timesteps=True)
def snr_stages(
    units: Sequence[str],
    timesteps: Sequence[int],
    sparsities: tuple[float, float, float] = (0.75, 0.25, 0.5),
    boundaries: tuple[int, int] = MOSAICDIFF_DIT_BOUNDARIES,
) -> Schedule:
    """Three stages by train timestep (noisy, middle, clean) with one sparsity each; step 0 stays full.

    Args:
        timesteps: the sampler's timesteps, one per step (`scheduler.timesteps` after `set_timesteps`).
        sparsities: levels of S for stages 1, 2, 3; MosaicDiff's pattern is high-low-high.
        boundaries: `(upper, lower)` train timesteps, as from `snr_stage_boundaries`.
    """
    t = np.asarray([int(x) for x in timesteps])
    upper, lower = boundaries
    stage = np.where(t >= upper, 0, np.where(t >= lower, 1, 2))
    grid = np.repeat(np.asarray(sparsities, dtype=float)[stage][:, None], len(units), axis=1)
    grid[0] = 0.0
    meta = {"method": "snr_stages", "sparsities": list(sparsities), "boundaries": list(boundaries)}
    return Schedule(grid, units, meta)


def at_budget(make: Callable[..., Schedule], knobs: Sequence[dict], table: MacTable, budget: float) -> Schedule:
    """Of `make(**knob)` for each knob setting, the schedule whose saved MAC fraction is closest to `budget`."""
    if not 0.0 <= budget < 1.0:
        raise ValueError(f"budget must be in [0, 1), got {budget}")
    best, best_gap = None, float("inf")
    for knob in knobs:
        schedule = make(**knob)
        gap = abs(table.saved_fraction(schedule) - budget)
        if gap < best_gap - 1e-12:
            best, best_gap = schedule, gap
    return best


def budget_schedules(table: MacTable, timesteps: Sequence[int], budget: float) -> dict[str, Schedule]:
    """Every registered hand-made allocator (`registry.ALLOCATORS`) fitted to `budget` (fraction of dense MACs
    saved), by name.

    A step count below 2 or a budget above what `len(timesteps)` steps can save (the first step is always full)
    is refused with what to choose instead (`solver.check_budget`).
    """
    units, n = list(table.units), len(timesteps)
    check_budget(budget, n, table)
    return {
        name: at_budget(lambda spec=spec, **k: spec.make(units, n, timesteps, **k), spec.fit(n), table, budget)
        for name, spec in ALLOCATORS.items()
    }

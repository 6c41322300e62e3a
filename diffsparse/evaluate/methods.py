"""Ways to save compute on one model, as runnable methods: dense, fewer steps, our token-cache schedules (every
hand-made allocator of `allocate.registry`), diffusers' own caches (FirstBlockCache, TaylorSeer,
PyramidAttentionBroadcast) through `diffusers.hooks`, and peers: other engines' caches (cache-dit, `peers.py`),
run where their package is installed (`pip install -e '.[peers]'`).

A `Method` says how many steps to sample and what to put on the transformer; `applied(method, transformer)`
yields the transformer to sample with (diffusers' caches and a method's own `apply` go on a copy, so the original
is never touched). `builders.BUILDERS` makes each method by its command-line name, fitted to a budget (`Fitting`); a
builder that cannot run here raises `Unavailable`, and the harness skips that row with its note.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig, hooks

from diffsparse.allocate.baselines import fewer_steps
from diffsparse.allocate.registry import ALLOCATORS, AllocatorSpec
from diffsparse.backbones.registry import JOINT_ATTN, SELF_ATTN, backbone_for
from diffsparse.cache import apply_token_cache, remove_token_cache
from diffsparse.prune.routing import StitchedModel, apply_pruning, parameter_bytes, remove_pruning
from diffsparse.schedule import Schedule


@dataclass
class Method:
    """One row of the evaluation: a name, the step count, and at most one of a schedule, a diffusers config, a
    pruning plan (`prune.PrunePlan`: weights routed into the model, or with `stitched` one pruned copy per stage) or
    `apply`, a function that sets the method up on a copy of the transformer (in place; a peer engine's cache)."""

    name: str
    num_steps: int
    schedule: Schedule | None = None
    selector: str | dict | None = None
    diffusers_config: object | None = None
    note: str = ""
    knobs: dict = field(default_factory=dict)
    pruning: object | None = None
    stitched: bool = False
    apply: Callable[[torch.nn.Module], None] | None = None

    def weight_bytes(self, transformer: torch.nn.Module) -> int:
        """Bytes of the weights this method keeps in memory: the model's, plus the routed store's pruned weights, or
        (stitched) every stage's pruned copy."""
        if self.pruning is None:
            return parameter_bytes(transformer)
        plan = self.pruning
        if self.stitched:
            return parameter_bytes(self.stitched_model(transformer))
        return parameter_bytes(transformer) + plan.compact_store().weight_bytes()

    def stitched_model(self, transformer: torch.nn.Module) -> torch.nn.Module:
        """The plan's stitched copies of `transformer`, built once per method."""
        if getattr(self, "_stitched_model", None) is None:
            self._stitched_model = StitchedModel(transformer, self.pruning.store, self.pruning.stage_levels)
        return self._stitched_model


DIT_SELF_ATTENTION = r"transformer_blocks\.\d+\.attn1"


def _apply_diffusers_cache(model: torch.nn.Module, config) -> None:
    appliers = {
        "FirstBlockCacheConfig": hooks.apply_first_block_cache,
        "TaylorSeerCacheConfig": hooks.apply_taylorseer_cache,
        "PyramidAttentionBroadcastConfig": hooks.apply_pyramid_attention_broadcast,
    }
    name = type(config).__name__
    if name not in appliers:
        raise ValueError(f"No applier for {name}; supported: {sorted(appliers)}")
    appliers[name](model, config)


@contextmanager
def applied(method: Method, transformer: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The transformer set up for `method`: token cache applied (and removed after), or a copy with a diffusers
    cache or the method's own `apply` on it."""
    if method.pruning is not None:
        plan = method.pruning
        if method.stitched:
            yield method.stitched_model(transformer)
            return
        apply_pruning(transformer, plan.store, plan.stage_levels)
        try:
            yield transformer
        finally:
            remove_pruning(transformer)
    elif method.apply is not None or method.diffusers_config is not None:
        model = copy.deepcopy(transformer)
        if method.apply is not None:
            method.apply(model)
        else:
            _apply_diffusers_cache(model, method.diffusers_config)
        yield model
    elif method.schedule is not None:
        options = {} if method.selector is None else {"selector": method.selector}
        apply_token_cache(transformer, method.schedule, **options)
        try:
            yield transformer
        finally:
            remove_token_cache(transformer)
    else:
        yield transformer


def first_block_cache(num_steps: int, threshold: float) -> Method:
    return Method(
        "FirstBlockCache",
        num_steps,
        diffusers_config=FirstBlockCacheConfig(threshold=threshold),
        knobs={"threshold": threshold},
    )


def taylorseer(num_steps: int, interval: int, unit_pattern: str) -> Method:
    """TaylorSeer on the cacheable units (first-order Taylor forecast of their outputs between full steps)."""
    config = TaylorSeerCacheConfig(
        cache_interval=interval, max_order=1, taylor_factors_dtype=torch.float32, cache_identifiers=[unit_pattern]
    )
    return Method("TaylorSeer", num_steps, diffusers_config=config, knobs={"cache_interval": interval})


def pyramid_attention_broadcast(
    num_steps: int, skip_range: int, timestep_range=(0, 1000), attention_pattern: str = DIT_SELF_ATTENTION
) -> Method:
    """PAB: self-attention outputs reused for `skip_range - 1` of every `skip_range` steps inside `timestep_range`
    (the attention modules whose names match `attention_pattern`: DiT's and PixArt's by default)."""
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=skip_range,
        spatial_attention_timestep_skip_range=timestep_range,
        spatial_attention_block_identifiers=[attention_pattern],
        current_timestep_callback=lambda: 500,
    )
    return Method("PAB", num_steps, diffusers_config=config, knobs={"skip_range": skip_range})


def unit_patterns(transformer: torch.nn.Module) -> tuple[str, str]:
    """Regexes (`re.fullmatch` on module names) of a model's cacheable units (TaylorSeer caches their outputs) and
    of its image self-attention modules (PAB), from the backbone registry. DiT: each block's `attn1` and `ff`, and
    its `attn1`; FLUX's single-stream blocks are units as a whole."""
    units, attention = [], []
    for blocks in backbone_for(transformer).block_lists:
        prefix = rf"{blocks.attr}\.\d+"
        children = list(dict.fromkeys(u.child for u in blocks.units))
        units += [prefix + (rf"\.{c}" if c else "") for c in children]
        attention += [rf"{prefix}\.{u.child}" for u in blocks.units if u.kind in (SELF_ATTN, JOINT_ATTN) and u.child]
    return "|".join(units), "|".join(dict.fromkeys(attention))


def fit_threshold(
    saved_at: Callable[[float], float], budget: float, low: float = 1e-3, high: float = 2.0, iterations: int = 10
) -> float:
    """Bisection (in log space) for the threshold whose measured saved-MAC fraction is closest to `budget`.

    `saved_at(threshold)` must grow with the threshold (true of FirstBlockCache).
    """  # fmt: skip
    best, best_gap = low, float("inf")
    for _ in range(iterations):
        mid = (low * high) ** 0.5
        saved = saved_at(mid)
        if abs(saved - budget) < best_gap:
            best, best_gap = mid, abs(saved - budget)
        if saved < budget:
            low = mid
        else:
            high = mid
    return best


def describe(knobs: dict) -> str:
    """A method's settings as the table's `setting` cell: `interval=2, fresh_ratio=0.25`."""

    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return ", ".join(
        f"{k}={fmt(v) if not isinstance(v, list) else '/'.join(fmt(x) for x in v)}" for k, v in knobs.items()
    )


@dataclass
class Fitting:
    """What a method is fitted to: steps, MAC budget and model, the hand-made schedules already fitted to the budget
    (by allocator name), the token selector of the run, and `saved(method)`, the measured fraction of dense MACs a
    method saves (for diffusers' caches, tuned by measuring)."""

    steps: int
    budget: float
    transformer: torch.nn.Module
    schedules: dict[str, Schedule]
    selector: str | dict | None
    saved: Callable[[Method], float]


def schedule_method(spec: AllocatorSpec) -> Callable[[Fitting], Method]:
    """The evaluation row of a registered hand-made allocator: its schedule fitted to the budget."""

    def build(fit: Fitting) -> Method:
        schedule = fit.schedules[spec.name]
        knobs = {k: v for k, v in schedule.meta.items() if k != "method"}
        return Method(spec.method, fit.steps, schedule, spec.selector or fit.selector, note=describe(knobs),
                      knobs=knobs)  # fmt: skip

    return build


def fewer_steps_method(fit: Fitting) -> Method:
    n = fewer_steps(fit.steps, fit.budget)
    return Method("fewer-steps", n, note=f"{n} steps", knobs={"steps": n})


def _described(method: Method) -> Method:
    method.note = describe(method.knobs)
    return method


def first_block_cache_method(fit: Fitting) -> Method:
    threshold = fit_threshold(lambda t: fit.saved(first_block_cache(fit.steps, t)), fit.budget)
    return _described(first_block_cache(fit.steps, threshold))


def taylorseer_method(fit: Fitting) -> Method:
    options = [taylorseer(fit.steps, n, unit_patterns(fit.transformer)[0]) for n in range(2, 7)]
    return _described(min(options, key=lambda m: abs(fit.saved(m) - fit.budget)))


def pab_method(fit: Fitting) -> Method:
    attention = unit_patterns(fit.transformer)[1]
    return _described(pyramid_attention_broadcast(fit.steps, 2, attention_pattern=attention))


class Unavailable(Exception):
    """A method that cannot run here (its optional package is not installed, or it does not take this model): the
    harness skips its row and says why (the message) in the log and under the table."""


# The hand-made allocators' methods: command-line name -> allocator name.
SCHEDULE_METHODS = {spec.method: spec.name for spec in ALLOCATORS.values()}

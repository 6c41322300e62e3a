"""Peers: the caching engines users pick today, as rows of `python -m diffsparse.evaluate`, fitted to the budget as
diffusers' caches are (by measuring MACs). Each runs where its package is installed (`pip install -e '.[peers]'`);
elsewhere its builder raises `Unavailable` and the harness skips the row with that note.

cache-dit (vipshop/cache-dit): DBCache, its dual block cache (the first `Fn` blocks run at every step; the others are
skipped, their residual reused, while the first blocks' residual has changed by less than `threshold` (relative L1)
since the last full step; the last `Bn` blocks run again on the reused output), with its TaylorSeer calibrator (the
reused residual forecast to first order from the last full steps). It goes on a bare transformer through
`cache_dit.enable_cache(transformer, cache_config=DBCacheConfig(...), calibrator_config=...)`, its transformer-only
path (the block adapter cache-dit registers for the model's class: DiT, PixArt, FLUX, Wan, ...), on the copy
`methods.applied` makes. It runs offline (nothing is downloaded).

Its cache context lives on the transformer and runs on across calls: cache-dit resets it only once a call has
counted more than `num_inference_steps` steps, which is one step into the next call. So `apply_cache_dit` also puts a
stateful diffusers hook on the model whose reset (`models.sampling.sample` resets every stateful hook at its start)
rebuilds the context (`cache_dit.refresh_context`): every sampling call starts from a fresh cache, as diffusers'
caches do.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from functools import partial

import torch
from diffusers.hooks import HookRegistry, ModelHook

from diffsparse.evaluate.methods import Fitting, Method, Unavailable, describe, fit_threshold

CACHE_DIT = "cache-dit"
NOT_INSTALLED = "cache-dit not installed: pip install -e '.[peers]'"
# DBCache's compute blocks: `F1B0`, cache-dit's fast setting (its default F8B0 needs 8 blocks; the digits DiT has 6)
FN_BLOCKS, BN_BLOCKS = 1, 0
TAYLORSEER_ORDER = 1
RESET_HOOK = "diffsparse_cache_dit_reset"


def _cache_dit():
    """The `cache_dit` module; `Unavailable` where it is not installed (or does not import)."""
    try:
        import cache_dit
    except ImportError as e:
        raise Unavailable(NOT_INSTALLED) from e
    return cache_dit


def unavailable(name: str) -> str | None:
    """Why method `name` cannot run here (a peer whose package is not installed), or None."""
    if name != CACHE_DIT:
        return None
    try:
        _cache_dit()
    except Unavailable as e:
        return str(e)
    return None


def warmup_steps(num_steps: int) -> int:
    """Steps DBCache always computes first: cache-dit's default 8, fewer (a quarter) in short runs."""
    return min(8, num_steps // 4)


@contextmanager
def _quiet():
    """cache-dit logs its set-up to stdout (its own handler), at INFO and, for a model that carries a diffusers hook
    registry (any model `sample` has run), a WARNING that it skips its block-pattern check; those lines are left
    out."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


class _FreshCacheDiT(ModelHook):
    """A stateful diffusers hook that only resets: it rebuilds cache-dit's cache context from its configs."""

    _is_stateful = True

    def __init__(self, cache_config, calibrator_config):
        super().__init__()
        self.cache_config, self.calibrator_config = cache_config, calibrator_config

    def reset_state(self, module: torch.nn.Module):
        with _quiet():
            _cache_dit().refresh_context(
                module,
                cache_config=copy.deepcopy(self.cache_config),
                calibrator_config=copy.deepcopy(self.calibrator_config),
            )
        return module


def apply_cache_dit(model: torch.nn.Module, cache_config, calibrator_config) -> None:
    """cache-dit on `model` (in place: a copy), reset at the start of every `sample` call."""
    cache_dit = _cache_dit()
    with _quiet():
        cache_dit.enable_cache(
            model, cache_config=copy.deepcopy(cache_config), calibrator_config=copy.deepcopy(calibrator_config)
        )
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(_FreshCacheDiT(cache_config, calibrator_config), RESET_HOOK)


def cache_dit_method(num_steps: int, threshold: float, warmup: int | None = None) -> Method:
    """cache-dit's DBCache (`F1B0`) with its first-order TaylorSeer calibrator, at residual threshold `threshold`."""
    cache_dit = _cache_dit()
    warmup = warmup_steps(num_steps) if warmup is None else warmup
    cache_config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=FN_BLOCKS,
        Bn_compute_blocks=BN_BLOCKS,
        residual_diff_threshold=threshold,
        max_warmup_steps=warmup,
        num_inference_steps=num_steps,
        enable_separate_cfg=False,  # `sample` runs the guided batch (conditional + unconditional) as one forward
    )
    calibrator_config = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=TAYLORSEER_ORDER)
    knobs = dict(threshold=threshold, warmup=warmup, Fn=FN_BLOCKS, Bn=BN_BLOCKS, taylorseer=TAYLORSEER_ORDER)
    apply = partial(apply_cache_dit, cache_config=cache_config, calibrator_config=calibrator_config)
    return Method(CACHE_DIT, num_steps, apply=apply, knobs=knobs)


def build_cache_dit(fit: Fitting) -> Method:
    """The cache-dit row: its residual threshold fitted by bisection on the measured saved-MAC fraction."""
    cache_dit = _cache_dit()
    if not cache_dit.BlockAdapterRegister.is_supported(fit.transformer):
        raise Unavailable(f"cache-dit has no block adapter for {type(fit.transformer).__name__}")
    threshold = fit_threshold(lambda t: fit.saved(cache_dit_method(fit.steps, t)), fit.budget)
    method = cache_dit_method(fit.steps, threshold)
    method.note = describe(method.knobs)
    return method

"""Analytic MACs of the cached units, plus the rest of the model measured once with `FlopCounterMode`.

A unit at a step computes `k` fresh tokens of `N` (see `fresh_tokens`):
- MLP: k x (sum of its Linear layers' in x out).
- self-attention: q and output projections on k tokens, k and v projections on all N tokens, and
  2 x inner_dim x k x N for QK^T and AV.
- cross-attention: q and output projections on k tokens, k and v on the M context tokens, 2 x inner x k x M.
- one stream of a joint attention (FLUX): its q and output projections on k tokens, 2 x inner x k x (N + M).
  Both streams' k and v projections (on all N + M tokens) run whenever either stream computes, and not at all when
  both reuse every token: a cost the two units share (`MacTable.shared`). Each stream's levels with k > 0 carry
  half of it, exact when both compute or both reuse; `MacTable.step_macs` adds the other half back where only one
  of them computes.
- single-stream block (FLUX): q, MLP and output projections on k image tokens, 2 x inner x k x (N + M); with any
  image token fresh (k > 0) also the same rows for the M text tokens, the k and v projections of all N + M tokens
  and the block's modulation. Reusing every image token reuses the text rows too: nothing runs.
- reuse-all (k = 0): nothing.
Everything outside the units (embeddings, norms, modulation, final layer) is the same at every step and is
measured as `FlopCounterMode(dense forward) / 2 - dense unit MACs`.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from diffsparse.backbones.registry import (
    CROSS_ATTN,
    JOINT_ATTN,
    MLP,
    MODULE,
    PARALLEL_BLOCK,
    SELF_ATTN,
    TEXT,
    UnitInfo,
    find_units,
)
from diffsparse.levels import ACTION_LEVELS, SPARSITY_LEVELS, fresh_tokens


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """`FlopCounterMode` that also counts the CPU flash-attention kernel (torch's table leaves it out)."""
    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _cpu_sdpa_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def _linear_macs(linear: torch.nn.Module) -> int:
    return int(linear.in_features) * int(linear.out_features)


def unit_macs(unit: UnitInfo, num_tokens: int, num_fresh: int, num_context: int = 0, reuse_kv: bool = False) -> int:
    """MACs of one call of `unit` for one sample with `num_fresh` of `num_tokens` tokens recomputed; `reuse_kv`:
    a self-attention unit projects keys and values of the fresh tokens only (`TokenCacheConfig.reuse_kv`)."""
    m = unit.module
    if num_fresh <= 0:
        return 0
    if unit.kind == MLP:
        return num_fresh * sum(_linear_macs(x) for x in m.modules() if isinstance(x, torch.nn.Linear))
    if unit.kind == JOINT_ATTN:
        q, out = (m.add_q_proj, m.to_add_out) if unit.stream == TEXT else (m.to_q, m.to_out[0])
        return num_fresh * (_linear_macs(q) + _linear_macs(out)) + 2 * q.out_features * num_fresh * (
            num_tokens + num_context
        )
    if unit.kind == PARALLEL_BLOCK:
        rows = _linear_macs(m.attn.to_q) + _linear_macs(m.proj_mlp) + _linear_macs(m.proj_out)
        queries = num_fresh + num_context  # the fresh image tokens and every text token
        keys = num_tokens + num_context
        kv = keys * (_linear_macs(m.attn.to_k) + _linear_macs(m.attn.to_v))
        return queries * rows + kv + 2 * m.attn.to_q.out_features * queries * keys + _linear_macs(m.norm.linear)
    kv_tokens = num_context if unit.kind == CROSS_ATTN else num_tokens
    inner = int(m.to_q.out_features)
    projections = num_fresh * (_linear_macs(m.to_q) + _linear_macs(m.to_out[0]))
    projected = num_fresh if reuse_kv and unit.kind == SELF_ATTN and unit.runner == MODULE else kv_tokens
    projections += projected * (_linear_macs(m.to_k) + _linear_macs(m.to_v))
    return projections + 2 * inner * num_fresh * kv_tokens


def shared_macs(unit: UnitInfo, num_tokens: int, num_context: int) -> int:
    """MACs per sample that `unit` shares with its partner unit: for a joint attention (either stream), the key
    and value projections of both streams, run when either stream computes. 0 for every other kind."""
    if unit.kind != JOINT_ATTN:
        return 0
    m = unit.module
    image, text = (num_context, num_tokens) if unit.stream == TEXT else (num_tokens, num_context)
    return image * (_linear_macs(m.to_k) + _linear_macs(m.to_v)) + text * (
        _linear_macs(m.add_k_proj) + _linear_macs(m.add_v_proj)
    )


def _probe(model: torch.nn.Module, units: list[UnitInfo], forward_kwargs: dict) -> tuple[dict, int]:
    """Run one dense forward: token counts per unit, and total MACs from FlopCounterMode."""
    shapes: dict[int, tuple[int, int, int]] = {}
    handles = []
    for u in units:
        signature = inspect.signature(u.module.forward)

        def record(module, args, kwargs, u=u, signature=signature):
            bound = signature.bind(*args, **kwargs).arguments
            x, ctx = bound["hidden_states"], bound.get("encoder_hidden_states")
            if u.kind == JOINT_ATTN and u.stream == TEXT:  # the text stream of a joint attention
                x, ctx = ctx, x
            shapes[u.index] = (x.shape[0], x.shape[1], ctx.shape[1] if ctx is not None else 0)

        handles.append(u.module.register_forward_pre_hook(record, with_kwargs=True))
    try:
        with torch.no_grad(), _runtime_paused(model), flop_counter() as counter:
            model(**forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    return shapes, counter.get_total_flops() // 2


@contextmanager
def _runtime_paused(model: torch.nn.Module):
    """The dense model for the probe: hooks in the model's diffusers `HookRegistry` whose `controller` can be
    `paused` (the token cache's) let inputs through meanwhile. Found by that attribute, so that accounting never
    imports the runtime it counts."""
    registry = getattr(model, "_diffusers_hook", None)
    hooks = registry.hooks.values() if registry is not None else ()
    controllers = [h.controller for h in hooks if hasattr(getattr(h, "controller", None), "paused")]
    for c in controllers:
        c.paused = True
    try:
        yield
    finally:
        for c in controllers:
            c.paused = False


def step_totals(costs: np.ndarray, choices: np.ndarray, other) -> np.ndarray:
    """Each step's cost for a (T, U) array of choices (indices into the last axis of the (U, C) `costs`), plus
    `other`, the cost outside the units."""
    picked = np.take_along_axis(np.asarray(costs)[None], np.asarray(choices)[..., None], axis=2)[..., 0]
    return picked.sum(axis=1) + other


@dataclass(frozen=True)
class MacTable:
    """MACs of one denoising step for the batch of the probe, per unit and sparsity level.

    `level_macs[u, j]` is unit u at `SPARSITY_LEVELS[j]`; `other` is everything outside the units. Budgets and
    hand-made schedules use it without running the model again. `shared` lists `(a, b, macs)`: work that units a
    and b share, run when either computes (a joint attention's keys and values). `level_macs` carries half of it on
    each one's computing levels, so the DP's additive costs are exact unless exactly one of the two computes;
    `step_macs` is exact.
    """

    units: tuple[str, ...]
    level_macs: np.ndarray
    other: int
    shared: tuple[tuple[int, int, int], ...] = ()

    unit_name = "MACs"  # how budgets on this table are worded

    @property
    def dense_step(self) -> int:
        return int(self.level_macs[:, 0].sum()) + self.other

    @property
    def full_step(self) -> int:
        """Every unit computing: the dense step (MACs do not depend on what was cached)."""
        return self.dense_step

    @property
    def level_costs(self) -> np.ndarray:
        return self.level_macs

    @property
    def action_costs(self) -> np.ndarray:
        """(U, |A|): copy and forecast compute the same tokens, so an action costs its level's MACs."""
        return self.level_macs[:, list(ACTION_LEVELS)]

    def step_macs(self, level_indices: np.ndarray) -> np.ndarray:
        """MACs of each step for a (T, U) array of level indices."""
        level_indices = np.asarray(level_indices)
        total = step_totals(self.level_macs, level_indices, self.other)
        reuse = len(SPARSITY_LEVELS) - 1  # the level that computes nothing
        for a, b, macs in self.shared:  # the half that the one computing unit did not carry
            a_on, b_on = level_indices[:, a] != reuse, level_indices[:, b] != reuse
            total = total + np.where(a_on & ~b_on, macs // 2, 0) + np.where(b_on & ~a_on, macs - macs // 2, 0)
        return total

    def saved_fraction(self, schedule) -> float:
        """Fraction of the dense trajectory's MACs that `schedule` skips."""
        schedule.check_units(self.units)
        return 1.0 - self.step_macs(schedule.level_indices()).sum() / (self.dense_step * schedule.num_steps)


def mac_table(model: torch.nn.Module, reuse_kv: bool = False, **forward_kwargs) -> MacTable:
    """Probe one dense forward of `model` on `forward_kwargs` and tabulate the MACs of every unit at every level
    (`reuse_kv`: as the token cache runs with `reuse_kv=True`)."""
    units = find_units(model)
    shapes, total = _probe(model, units, forward_kwargs)
    missing = [u.name for u in units if u.index not in shapes]
    if missing:
        raise RuntimeError(f"Units {missing[:3]} did not run in the example forward; check forward_kwargs.")
    table = np.zeros((len(units), len(SPARSITY_LEVELS)), dtype=np.int64)
    partners: dict[int, list[int]] = {}  # the streams of one joint attention, by its module
    for u in units:
        b, n, m = shapes[u.index]
        table[u.index] = [b * unit_macs(u, n, fresh_tokens(s, n), m, reuse_kv) for s in SPARSITY_LEVELS]
        if shared_macs(u, n, m):
            partners.setdefault(id(u.module), []).append(u.index)
    shared = []
    for a, b in partners.values():
        macs = shapes[a][0] * shared_macs(units[a], *shapes[a][1:])
        shared.append((a, b, macs))
        table[a, :-1] += macs - macs // 2  # every level but the one that reuses all tokens
        table[b, :-1] += macs // 2
    other = max(total - int(table[:, 0].sum()), 0)
    return MacTable(tuple(u.name for u in units), table, other, tuple(shared))


def schedule_macs(schedule, model: torch.nn.Module, reuse_kv: bool = False, **forward_kwargs) -> dict:
    """Dense and cached MACs of one trajectory of `schedule` for the batch in `forward_kwargs` (`reuse_kv`: the
    token cache's option)."""
    table = mac_table(model, reuse_kv, **forward_kwargs)
    schedule.check_units(table.units)
    per_step = table.step_macs(schedule.level_indices())
    dense = table.dense_step * schedule.num_steps
    cached = int(per_step.sum())
    return {
        "dense": dense,
        "cached": cached,
        "reduction": dense / cached if cached else float("inf"),
        "per_step_cached": per_step.tolist(),
        "other_per_step": table.other,
    }

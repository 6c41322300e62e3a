"""Key/value reuse (`reuse_kv=True`): partial self-attention steps project keys and values of the fresh tokens only
and take the others' from when they were last computed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import max_diff, run_loop

from diffsparse.accounting.macs import _linear_macs
from diffsparse.backbones import build_transformer, example_inputs
from diffsparse.backbones.registry import SELF_ATTN
from diffsparse.cache import TokenCacheConfig, apply_token_cache, cacheable_units, remove_token_cache
from diffsparse.schedule import Schedule

STEPS = [900, 700, 500, 300, 100]


def half_schedule(model, forecast: bool = False) -> Schedule:
    """Full at steps 0 and 3, every unit at sparsity 0.5 elsewhere."""
    units = cacheable_units(model)
    grid = np.full((len(STEPS), len(units)), 0.5)
    grid[[0, 3]] = 0.0
    return Schedule(grid, units, forecast=(grid > 0) & forecast)


@pytest.mark.parametrize("backbone", ["dit", "pixart"])
def test_sparsity_zero_and_the_full_steps_are_unchanged(backbone):
    torch.manual_seed(0)
    model = build_transformer(backbone, "tiny").eval()
    inputs = example_inputs(model, batch=2)
    dense = run_loop(model, inputs, STEPS)
    apply_token_cache(model, Schedule.uniform(model, len(STEPS), 0.0), reuse_kv=True)
    assert max_diff(dense, run_loop(model, inputs, STEPS)) == 0.0
    remove_token_cache(model)

    schedule = half_schedule(model)
    apply_token_cache(model, schedule, selector="norm")
    plain = run_loop(model, inputs, STEPS)
    remove_token_cache(model)
    apply_token_cache(model, schedule, selector="norm", reuse_kv=True)
    kept = run_loop(model, inputs, STEPS)
    remove_token_cache(model)
    # the first full step keeps keys and values (its own attention, same operations as the processor)
    assert torch.allclose(kept[0], plain[0], atol=1e-6, rtol=0)
    assert not torch.allclose(kept[1], plain[1], atol=1e-6)  # partial steps now use the stale keys


@pytest.mark.parametrize("selector", ["norm", "toca"])
def test_reused_tokens_keep_their_keys_and_fresh_tokens_get_new_ones(selector):
    torch.manual_seed(0)
    model = build_transformer("dit", "tiny").eval()
    inputs = example_inputs(model, batch=2)
    controller = apply_token_cache(model, half_schedule(model), selector=selector, reuse_kv=True)
    attn = model.transformer_blocks[0].attn1
    unit = next(u for u in controller.units if u.module is attn)
    seen = []

    def record(module, args, kwargs, output):
        state = controller.current
        x = args[0] if args else kwargs["hidden_states"]
        seen.append((x.clone(), [t.clone() for t in state.kv[unit.index]], state.last_fresh[unit.index].clone()))

    handle = attn.register_forward_hook(record, with_kwargs=True)
    run_loop(model, inputs, STEPS[:2])
    handle.remove()
    (x0, kv0, _), (x1, kv1, fresh_at) = seen
    torch.testing.assert_close(kv0[0], attn.to_k(x0), rtol=0, atol=1e-6)
    fresh = (fresh_at == 1).unsqueeze(-1)  # the tokens computed at step 1
    assert 0 < int(fresh.sum()) < fresh.numel()
    for now, before, proj in zip(kv1, kv0, (attn.to_k, attn.to_v), strict=True):
        expected = torch.where(fresh, proj(x1), before)
        torch.testing.assert_close(now, expected, rtol=0, atol=1e-6)
    remove_token_cache(model)


def test_macs_count_the_saved_key_value_projections():
    torch.manual_seed(0)
    model = build_transformer("dit", "tiny").eval()
    inputs = example_inputs(model, batch=2)
    kwargs = dict(inputs, timestep=torch.full((2,), 500))
    schedule = half_schedule(model)
    plain, kept = schedule.macs(model, **kwargs), schedule.macs(model, reuse_kv=True, **kwargs)
    assert kept["dense"] == plain["dense"]
    tokens = inputs["hidden_states"].shape[-1] * inputs["hidden_states"].shape[-2] // 4
    reused = tokens - tokens // 2  # tokens not recomputed per partial call
    units = [u for u in controller_units(model) if u.kind == SELF_ATTN]
    per_call = sum(_linear_macs(u.module.to_k) + _linear_macs(u.module.to_v) for u in units) * reused * 2
    assert plain["cached"] - kept["cached"] == per_call * int((schedule.grid[:, 0] == 0.5).sum())


def controller_units(model):
    controller = apply_token_cache(model, Schedule.uniform(model, 2, 0.0))
    units = controller.units
    remove_token_cache(model)
    return units


def test_reuse_kv_refusals():
    with pytest.raises(ValueError, match="reuse_kv='yes': use True or False"):
        TokenCacheConfig(reuse_kv="yes")
    model = build_transformer("pixart", "tiny").eval()
    inputs = example_inputs(model, batch=2)
    tokens = inputs["hidden_states"].shape[-1] * inputs["hidden_states"].shape[-2] // 4
    apply_token_cache(model, half_schedule(model), selector="norm", reuse_kv=True)
    with pytest.raises(ValueError, match="attention masks are not supported with reuse_kv=True"):
        run_loop(model, {**inputs, "attention_mask": torch.ones(2, tokens)}, STEPS)
    remove_token_cache(model)

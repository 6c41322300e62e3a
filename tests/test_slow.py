"""Larger-scale checks (DiT-B/2, 256 tokens, 50 DDIM steps). Run with `python -m pytest -m slow`."""

import pytest
import torch
from conftest import max_diff, run_loop

from diffsparse import Schedule, apply_token_cache, cacheable_units, remove_token_cache
from diffsparse.accounting.macs import flop_counter
from diffsparse.allocate.baselines import toca
from diffsparse.backbones import build_transformer, example_inputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dit_b2():
    model = build_transformer("dit", "B/2", sample_size=32)
    return model, example_inputs(model, batch=2)


TIMESTEPS = list(range(980, 0, -20))  # 49 steps


def test_b2_sparsity_zero_is_exact_over_a_long_trajectory(dit_b2):
    model, inputs = dit_b2
    dense = run_loop(model, inputs, TIMESTEPS)
    apply_token_cache(model, Schedule.uniform(cacheable_units(model), len(TIMESTEPS), 0.0))
    try:
        assert max_diff(dense, run_loop(model, inputs, TIMESTEPS)) == 0.0
    finally:
        remove_token_cache(model)


def test_b2_trajectory_macs_match_the_flop_counter(dit_b2):
    model, inputs = dit_b2
    sched = toca(cacheable_units(model), len(TIMESTEPS), ramp=0.0)
    predicted = sched.macs(model, **inputs)
    apply_token_cache(model, sched)
    try:
        with torch.no_grad(), flop_counter() as counter:
            outs = run_loop(model, inputs, TIMESTEPS)
    finally:
        remove_token_cache(model)
    assert all(torch.isfinite(o).all() for o in outs)
    assert predicted["cached"] == pytest.approx(counter.get_total_flops() // 2, rel=0.05)
    assert predicted["reduction"] > 1.4

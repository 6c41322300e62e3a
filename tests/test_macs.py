import pytest
import torch
from conftest import run_loop

from diffsparse import Schedule, apply_token_cache, cacheable_units
from diffsparse.accounting.macs import flop_counter, unit_macs
from diffsparse.allocate.baselines import toca
from diffsparse.backbones import build_transformer, example_inputs, find_units


def counted_macs(fn) -> int:
    with torch.no_grad(), flop_counter() as counter:
        fn()
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("num_fresh", [16, 12, 8, 4, 1])
def test_unit_formula_matches_flop_counter(model, inputs, num_fresh):
    n = (model.config.sample_size // 2) ** 2
    x = torch.randn(2, n, model.config.num_attention_heads * model.config.attention_head_dim)
    text = torch.randn(2, 8, x.shape[-1])
    for u in find_units(model):
        fresh = x[:, :num_fresh]
        if u.kind == "self_attn":
            call = lambda u=u, fresh=fresh: u.module(fresh, encoder_hidden_states=x)  # noqa: E731
            context = 0
        elif u.kind == "cross_attn":
            call = lambda u=u, fresh=fresh: u.module(fresh, encoder_hidden_states=text)  # noqa: E731
            context = text.shape[1]
        else:
            call = lambda u=u, fresh=fresh: u.module(fresh)  # noqa: E731
            context = 0
        batch = x.shape[0]
        assert counted_macs(call) == batch * unit_macs(u, n, num_fresh, context), u.name


@pytest.mark.parametrize("make", ["uniform-0.5", "uniform-0.75", "toca", "dense"])
def test_trajectory_macs_match_flop_counter_within_5_percent(model, inputs, make):
    units = cacheable_units(model)
    sched = {
        "uniform-0.5": lambda: Schedule.uniform(units, 5, 0.5),
        "uniform-0.75": lambda: Schedule.uniform(units, 5, 0.75),
        "toca": lambda: toca(units, 5, interval=2),
        "dense": lambda: Schedule.uniform(units, 5, 0.0),
    }[make]()
    predicted = sched.macs(model, **inputs)
    dense_measured = counted_macs(lambda: run_loop(model, inputs))
    apply_token_cache(model, sched)
    cached_measured = counted_macs(lambda: run_loop(model, inputs))
    assert predicted["dense"] == pytest.approx(dense_measured, rel=0.05)
    assert predicted["cached"] == pytest.approx(cached_measured, rel=0.05)
    if make != "dense":
        assert predicted["reduction"] > 1.2


def test_macs_on_a_larger_model_with_the_cache_applied():
    model = build_transformer("dit", "S/2", sample_size=16)
    inputs = example_inputs(model, batch=2)
    sched = Schedule.uniform(cacheable_units(model), 3, 0.75)
    apply_token_cache(model, sched)
    predicted = sched.macs(model, **inputs)  # the probe forward must not advance the cache's step
    measured = counted_macs(lambda: run_loop(model, inputs, [900, 500, 100]))
    assert predicted["cached"] == pytest.approx(measured, rel=0.05)
    # Units dominate: the analytic part (not the measured remainder) carries the reduction.
    assert predicted["other_per_step"] < 0.05 * predicted["dense"] / 3

import pytest
import torch
from conftest import call_pipeline, max_diff, run_loop

from diffsparse import (
    Schedule,
    ScheduleError,
    apply_token_cache,
    cacheable_units,
    remove_token_cache,
    reset_token_cache,
)
from diffsparse.cache import SELECTORS
from diffsparse.cache.hooks import token_cache_controller


def test_units_follow_the_registry(model, backbone):
    units = cacheable_units(model)
    per_block = {"dit": ["attn1", "ff"], "pixart": ["attn1", "attn2", "ff"]}[backbone]
    assert units == [f"transformer_blocks.{b}.{c}" for b in range(2) for c in per_block]


@pytest.mark.parametrize("selector", SELECTORS)
def test_sparsity_zero_is_exactly_dense_in_a_loop(model, inputs, selector):
    dense = run_loop(model, inputs)
    apply_token_cache(model, Schedule.uniform(cacheable_units(model), 5, 0.0), selector=selector)
    cached = run_loop(model, inputs)
    assert max_diff(dense, cached) <= 1e-6


def test_remove_gives_the_original_model_back(model, inputs):
    before_keys = set(model.__dict__)
    before_modules = {name: set(m.__dict__) for name, m in model.named_modules()}
    dense = run_loop(model, inputs)
    apply_token_cache(model, Schedule.uniform(cacheable_units(model), 5, 0.5))
    assert max_diff(dense, run_loop(model, inputs)) > 1e-4
    remove_token_cache(model)
    assert set(model.__dict__) == before_keys
    assert {name: set(m.__dict__) for name, m in model.named_modules()} == before_modules
    assert not any(hasattr(m, "_diffusers_hook") for m in model.modules())
    assert max_diff(dense, run_loop(model, inputs)) == 0.0
    with pytest.warns(UserWarning, match="No token cache"):
        remove_token_cache(model)  # nothing to remove: a warning, not an error


@pytest.mark.parametrize("selector", SELECTORS)
def test_half_sparsity_changes_outputs_but_stays_finite(model, inputs, selector):
    dense = run_loop(model, inputs)
    apply_token_cache(model, Schedule.uniform(cacheable_units(model), 5, 0.5), selector=selector)
    cached = run_loop(model, inputs)
    assert all(torch.isfinite(c).all() for c in cached)
    assert max_diff(dense[1:], cached[1:]) > 1e-4
    # Only partial steps differ: step 0 computes everything.
    assert max_diff(dense[:1], cached[:1]) <= 1e-5


def test_full_reuse_returns_the_cached_unit_outputs(model, inputs):
    outputs: dict[str, list[torch.Tensor]] = {}
    for name in cacheable_units(model):
        module = model.get_submodule(name)
        module.register_forward_hook(lambda m, a, o, name=name: outputs.setdefault(name, []).append(o.clone()))
    # Blocks run (skip_blocks=False) so that the units are called; tests/test_block_skip.py checks the skip.
    apply_token_cache(model, Schedule.uniform(cacheable_units(model), 5, 1.0), skip_blocks=False)
    run_loop(model, inputs)
    for name, outs in outputs.items():
        assert len(outs) == 5
        for later in outs[1:]:
            assert torch.equal(later, outs[0]), name


def test_partial_units_really_compute_fewer_tokens(model, inputs):
    seen: dict[str, list[int]] = {}
    for u in cacheable_units(model):
        module = model.get_submodule(u)
        # `forward` of the module instance is wrapped by the hook; `__call__` sees the full-size input and output,
        # so watch the inner Linear layers instead: the first one sees only the fresh tokens.
        first_linear = next(m for m in module.modules() if isinstance(m, torch.nn.Linear))
        first_linear.register_forward_pre_hook(lambda m, a, u=u: seen.setdefault(u, []).append(a[0].shape[1]))
    apply_token_cache(model, Schedule.uniform(cacheable_units(model), 5, 0.75))
    run_loop(model, inputs)
    n = (model.config.sample_size // 2) ** 2
    for u, counts in seen.items():
        assert counts == [n] + [n // 4] * 4, (u, counts)


def test_cfg_halves_choose_the_same_tokens(model, inputs):
    x = inputs["hidden_states"]
    inputs = dict(inputs, hidden_states=torch.cat([x[:1], x[:1]]))
    picked = []
    controller = apply_token_cache(model, Schedule.uniform(cacheable_units(model), 5, 0.5), selector="norm")
    select = controller.selector.select
    flags = []

    def spy(x, k, state, unit):
        flags.append(state.cfg)
        picked.append(select(x, k, state, unit))
        return picked[-1]

    controller.selector.select = spy
    run_loop(model, inputs)
    assert flags and all(flags)
    assert picked and all(torch.equal(idx[0], idx[1]) for idx in picked)


def test_second_pipeline_call_starts_clean(pipeline):
    units = cacheable_units(pipeline.transformer)
    dense = call_pipeline(pipeline)
    apply_token_cache(pipeline.transformer, Schedule.uniform(units, 4, 0.0))
    first = call_pipeline(pipeline)
    assert float((first - dense).abs().max()) <= 1e-6
    remove_token_cache(pipeline.transformer)
    apply_token_cache(pipeline.transformer, Schedule.uniform(units, 4, 0.5))
    a = call_pipeline(pipeline)
    b = call_pipeline(pipeline)
    assert torch.equal(a, b)
    assert float((a - dense).abs().max()) > 1e-5
    # After the last step the cache is freed: nothing of this call is left for the next one.
    assert all(s.step == -1 and not s.cache for s in token_cache_controller(pipeline.transformer).states.values())
    remove_token_cache(pipeline.transformer)
    assert torch.equal(call_pipeline(pipeline), dense)


def test_loop_restarts_when_timesteps_go_up(model, inputs):
    apply_token_cache(model, Schedule.uniform(cacheable_units(model), 5, 0.5))
    a = run_loop(model, inputs)
    b = run_loop(model, inputs)  # no explicit reset: the timestep jump starts a new trajectory
    assert max_diff(a, b) == 0.0
    run_loop(model, inputs, [900, 700])
    reset_token_cache(model)
    assert max_diff(a, run_loop(model, inputs)) == 0.0


def test_too_many_steps_raise(model, inputs):
    apply_token_cache(model, Schedule.uniform(cacheable_units(model), 3, 0.5))
    with pytest.raises(ScheduleError, match="Schedule has 3 steps but the sampling loop runs more"):
        run_loop(model, inputs, [900, 700, 500, 300])


def test_too_few_steps_warn(model, inputs, caplog):
    apply_token_cache(model, Schedule.uniform(cacheable_units(model), 5, 0.5))
    run_loop(model, inputs, [900, 700])
    reset_token_cache(model)
    assert "ran 2 steps but the schedule has 5" in caplog.text


def test_unsupported_model_lists_supported_ones():
    with pytest.raises(TypeError, match="DiTTransformer2DModel.*PixArtTransformer2DModel"):
        apply_token_cache(torch.nn.Linear(2, 2), Schedule.uniform(["a"], 2, 0.5))


def test_schedule_for_other_units_is_rejected(model):
    with pytest.raises(ScheduleError, match="made for 1 units"):
        apply_token_cache(model, Schedule.uniform(["transformer_blocks.0.attn1"], 5, 0.5))
    assert not any(hasattr(m, "_diffusers_hook") for m in model.modules())  # nothing half-applied


def test_bad_options_are_rejected(model):
    sched = Schedule.uniform(cacheable_units(model), 5, 0.5)
    with pytest.raises(TypeError, match="Unknown token-cache option"):
        apply_token_cache(model, sched, selectr="norm")
    with pytest.raises(ValueError, match="Unknown selector"):
        apply_token_cache(model, sched, selector="best")
    apply_token_cache(model, sched)
    with pytest.raises(RuntimeError, match="already applied"):
        apply_token_cache(model, sched)


def test_dit_rejects_cross_attention_weight():
    from diffsparse.backbones import build_transformer

    model = build_transformer("dit", "tiny")
    sched = Schedule.uniform(cacheable_units(model), 5, 0.5)
    with pytest.raises(ValueError, match="entropy"):
        apply_token_cache(model, sched, selector={"name": "toca", "cross_attn_weight": 1.0})

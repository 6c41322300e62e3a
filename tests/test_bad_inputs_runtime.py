"""Bad inputs to the token-cache runtime and to `diffsparse.inference`: a clear error or warning, nothing kept."""

import logging

import pytest
import torch
from conftest import call_pipeline, max_diff, run_loop

from diffsparse import Schedule, apply_token_cache, cacheable_units, remove_token_cache
from diffsparse.cache import TokenCacheConfig
from diffsparse.cache.hooks import token_cache_controller
from diffsparse.evaluate.inference import compare_with_dense, resolve_schedule, run_inference, run_pruned_inference


def inputs_at(model, batch: int, side: int, same_halves: bool = False, seed: int = 0) -> dict:
    """Forward keywords for `model` with a `side x side` latent (the model was built for another size)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, side, side, generator=g)
    if same_halves:
        x = torch.cat([x[: batch // 2], x[: batch // 2]])
    if type(model).__name__ == "DiTTransformer2DModel":
        return dict(hidden_states=x, class_labels=torch.arange(batch) % cfg.num_embeds_ada_norm)
    return dict(
        hidden_states=x,
        encoder_hidden_states=torch.randn(batch, 4, cfg.caption_channels, generator=g),
        encoder_attention_mask=torch.ones(batch, 4),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


def schedule_with_rows(model, rows: list[float]) -> Schedule:
    units = cacheable_units(model)
    return Schedule([[s] * len(units) for s in rows], units)


# --- the cfg option ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", ["yes", "true", "Auto", 1, 0, None, 2.0])
def test_cfg_option_takes_only_true_false_or_auto(model, cfg):
    sched = Schedule.uniform(cacheable_units(model), 3, 0.5)
    with pytest.raises(ValueError, match=r"cfg=.*use cfg=True .* cfg=False .* cfg='auto'"):
        apply_token_cache(model, sched, cfg=cfg)
    assert not any(hasattr(m, "_diffusers_hook") for m in model.modules())  # nothing half-applied
    with pytest.raises(ValueError, match="cfg="):
        TokenCacheConfig(cfg=cfg)
    config = TokenCacheConfig(schedule=sched)
    config.cfg = cfg  # changed after construction: still refused when applied
    with pytest.raises(ValueError, match="cfg="):
        apply_token_cache(model, config)


@pytest.mark.parametrize("cfg", [True, False, "auto"])
def test_cfg_option_documented_values_still_work(model, inputs, cfg):
    apply_token_cache(model, Schedule.uniform(cacheable_units(model), 3, 0.5), cfg=cfg)
    assert all(torch.isfinite(o).all() for o in run_loop(model, inputs, [900, 700, 500]))


# --- batch size / resolution changes within a trajectory --------------------------------------------------------
def spy_on_grids(controller) -> list:
    """The token grid each partial-step selection sees."""
    grids, select = [], controller.selector.select
    controller.selector.select = lambda x, k, state, unit: grids.append(state.grid) or select(x, k, state, unit)
    return grids


def test_resolution_change_at_a_full_step_rebuilds_the_token_grid(model):
    small, large = inputs_at(model, 2, 8), inputs_at(model, 2, 16, seed=1)
    controller = apply_token_cache(model, schedule_with_rows(model, [0, 0.5, 0, 0.5]))
    grids = spy_on_grids(controller)
    run_loop(model, small, [900, 700])
    assert grids and set(grids) == {(4, 4)}
    grids.clear()
    changed = run_loop(model, large, [500, 300])  # steps 2 (full) and 3 (partial) of the same trajectory
    assert grids and set(grids) == {(8, 8)}  # not step 0's (4, 4): the spatial bonus would tile 64 tokens wrongly
    remove_token_cache(model)
    # The same two steps as a fresh trajectory at the new size: a full step, then the same partial step.
    apply_token_cache(model, schedule_with_rows(model, [0, 0.5]))
    assert max_diff(changed, run_loop(model, large, [500, 300])) <= 1e-6


def test_batch_change_at_a_full_step_looks_at_the_cfg_halves_again(model):
    pairs = inputs_at(model, 2, 8, same_halves=True)
    three = inputs_at(model, 3, 8, seed=1)
    controller = apply_token_cache(model, schedule_with_rows(model, [0, 0.5, 0, 0.5]), selector="norm")
    run_loop(model, pairs, [900, 700])
    assert controller.current.cfg  # the two halves are equal: CFG pairs
    changed = run_loop(model, three, [500, 300])  # step 0's CFG flag would pair rows of an odd batch
    remove_token_cache(model)
    apply_token_cache(model, schedule_with_rows(model, [0, 0.5]), selector="norm")
    assert max_diff(changed, run_loop(model, three, [500, 300])) <= 1e-6


def test_shape_change_on_a_step_that_reuses_tokens_is_refused(model):
    small, large = inputs_at(model, 2, 8), inputs_at(model, 2, 16, seed=1)
    controller = apply_token_cache(model, schedule_with_rows(model, [0, 0.5, 0.5]))
    run_loop(model, small, [900])
    with pytest.raises(RuntimeError, match=r"changed shape at step 1 .*reset_token_cache\(model\)"):
        run_loop(model, large, [700])
    assert all(not s.cache for s in controller.states.values())  # nothing of the old shape kept
    assert all(torch.isfinite(o).all() for o in run_loop(model, large, [900, 700, 500]))  # starts clean


# --- a schedule longer than the run -----------------------------------------------------------------------------
def test_short_pipeline_call_warns_once_and_frees_its_cache(pipeline, caplog):
    pipeline.set_progress_bar_config(disable=True)
    transformer = pipeline.transformer
    before = set(transformer.__dict__)
    controller = apply_token_cache(transformer, Schedule.uniform(cacheable_units(transformer), 6, 0.5))
    with caplog.at_level(logging.WARNING, logger="diffsparse"):
        first = call_pipeline(pipeline, steps=4)
        assert not controller.states and controller.current is None  # freed when the call ended
        assert caplog.text.count("ran 4 steps but the schedule has 6") == 1
        second = call_pipeline(pipeline, steps=4)
    assert torch.equal(first, second)  # nothing of the first call leaked into the second
    assert caplog.text.count("ran 4 steps but the schedule has 6") == 1  # once, not once per call
    assert not controller.states
    remove_token_cache(transformer)
    assert set(transformer.__dict__) == before


def test_short_loop_is_freed_and_warned_about_when_the_cache_is_removed(model, inputs, caplog):
    controller = apply_token_cache(model, Schedule.uniform(cacheable_units(model), 6, 0.5))
    with caplog.at_level(logging.WARNING, logger="diffsparse"):
        run_loop(model, inputs, [900, 700, 500])
        remove_token_cache(model)
    assert "ran 3 steps but the schedule has 6" in caplog.text
    assert not controller.states and token_cache_controller(model) is None


# --- diffsparse.inference ---------------------------------------------------------------------------------------
UNITS = ["transformer_blocks.0.attn1", "transformer_blocks.0.ff"]


@pytest.mark.parametrize("num_steps", [0, -3, 2.5, True])
def test_resolve_schedule_refuses_bad_step_counts(tmp_path, num_steps):
    with pytest.raises(ValueError, match=r"num_steps must be a whole number >= 1 \(e.g. num_steps=20\)"):
        resolve_schedule(None, UNITS, num_steps, 0.5)
    path = Schedule.uniform(UNITS, 4, 0.5).save(tmp_path / "s.json")
    with pytest.raises(ValueError, match="num_steps must be a whole number"):
        resolve_schedule(str(path), UNITS, num_steps, 0.5)


def test_resolve_schedule_good_step_counts_still_work(tmp_path):
    assert resolve_schedule(None, UNITS, None, 0.5).num_steps == 20
    assert resolve_schedule(None, UNITS, 7, 0.5).num_steps == 7
    path = Schedule.uniform(UNITS, 4, 0.5).save(tmp_path / "s.json")
    assert resolve_schedule(str(path), UNITS, 4, 0.5).num_steps == 4


class Untouchable:
    """Stands for a pipeline or plan: any use of it fails the test (the check must come first)."""

    def __getattr__(self, name):
        raise AssertionError(f"touched .{name} before refusing the input")


@pytest.mark.parametrize("rounds", [0, -1, 1.5])
def test_rounds_below_one_are_refused_before_any_sampling(rounds):
    calls = []
    with pytest.raises(ValueError, match=r"rounds must be a whole number >= 1 \(e.g. rounds=2\)"):
        compare_with_dense(lambda: calls.append("dense"), lambda: calls.append("method"), rounds)
    assert calls == []
    with pytest.raises(ValueError, match="rounds must be"):
        run_inference(Untouchable(), Schedule.uniform(UNITS, 4, 0.5), [1, 2], rounds=rounds)
    with pytest.raises(ValueError, match="rounds must be"):
        run_pruned_inference(Untouchable(), Untouchable(), [1, 2], rounds=rounds)

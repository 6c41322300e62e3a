"""The public API in diffusers' style: a config or a schedule alone, a whole pipeline, the summary, registered
selectors, the apply / remove rules, diffusers' own caches refused, and what the "Use it" guide's blocks
(docs/guides/apply.md) claim."""

import re
from pathlib import Path

import pytest
import torch
from conftest import call_pipeline, max_diff, run_loop
from diffusers.hooks import (
    FirstBlockCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_pyramid_attention_broadcast,
)

import diffsparse
import diffsparse.cache
from diffsparse import (
    Schedule,
    SelectorConfig,
    TokenCacheConfig,
    apply_token_cache,
    cacheable_units,
    disable_token_cache,
    enable_token_cache,
    remove_token_cache,
    token_cache_summary,
)
from diffsparse.backbones import build_transformer, example_inputs, tiny_pipeline
from diffsparse.cache import SELECTORS, TokenSelector, register_selector
from diffsparse.cache.hooks import token_cache_controller
from diffsparse.levels import fresh_tokens

ROOT = Path(__file__).resolve().parents[1]
FLOW_TIMESTEPS = {"flux": [0.9, 0.7, 0.5, 0.3, 0.1], "wan": [900, 700, 500, 300, 100]}


def _pab(model):
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 500
    )
    apply_pyramid_attention_broadcast(model, config)


def _hookless(model) -> bool:
    return not any(hasattr(m, "_diffusers_hook") for m in model.modules())


# --- one config, or a schedule alone ----------------------------------------------------------------------------
def test_a_config_and_a_schedule_with_options_run_the_same(model, inputs):
    sched = Schedule.uniform(model, num_steps=5, sparsity=0.5)
    assert sched == Schedule.uniform(units=cacheable_units(model), num_steps=5, sparsity=0.5)
    apply_token_cache(model, sched, selector="norm", cfg=False)
    with_options = run_loop(model, inputs)
    remove_token_cache(model)
    controller = apply_token_cache(model, TokenCacheConfig(schedule=sched, selector="norm", cfg=False))
    assert controller.selector.name == "norm" and controller.cfg_mode is False
    assert max_diff(with_options, run_loop(model, inputs)) == 0.0
    remove_token_cache(model)
    apply_token_cache(model, sched)  # a schedule alone: the backbone's default selector
    alone = run_loop(model, inputs)
    remove_token_cache(model)
    apply_token_cache(model, TokenCacheConfig(schedule=sched))
    assert max_diff(alone, run_loop(model, inputs)) == 0.0


def test_config_mistakes_are_refused_with_the_fix(model):
    sched = Schedule.uniform(model, num_steps=3, sparsity=0.5)
    with pytest.raises(TypeError, match="not both"):
        apply_token_cache(model, TokenCacheConfig(schedule=sched), selector="norm")
    with pytest.raises(TypeError, match=r"Schedule, got NoneType.*TokenCacheConfig\(schedule=...\)"):
        apply_token_cache(model, TokenCacheConfig(selector="norm"))
    with pytest.raises(
        TypeError,
        match="Unknown token-cache option.*valid: \\['cfg', 'compile_units', 'forecast_dtype', 'forecast_order', "
        "'reuse_kv', 'selector', 'skip_blocks'\\]",
    ):
        apply_token_cache(model, sched, schedule=sched)
    with pytest.raises(TypeError, match="pipeline's transformer"):
        Schedule.uniform(tiny_pipeline("dit"), num_steps=3, sparsity=0.5)
    assert _hookless(model)


# --- a whole pipeline -------------------------------------------------------------------------------------------
def test_enable_on_a_pipeline_is_apply_on_its_transformer(pipeline):
    units = cacheable_units(pipeline.transformer)
    sched = Schedule.uniform(pipeline.transformer, num_steps=4, sparsity=0.5)
    apply_token_cache(pipeline.transformer, sched)
    applied = call_pipeline(pipeline)
    remove_token_cache(pipeline.transformer)
    controller = enable_token_cache(pipeline, sched)
    assert token_cache_controller(pipeline.transformer) is controller and controller.schedule.units == tuple(units)
    assert torch.equal(call_pipeline(pipeline), applied)
    with pytest.raises(RuntimeError, match="already applied"):
        enable_token_cache(pipeline, TokenCacheConfig(schedule=sched))
    disable_token_cache(pipeline)
    assert _hookless(pipeline.transformer)
    with pytest.warns(UserWarning, match="No token cache"):
        disable_token_cache(pipeline)
    with pytest.raises(TypeError, match="no `transformer` component.*apply_token_cache"):
        enable_token_cache(pipeline.transformer, sched)


# --- the summary ------------------------------------------------------------------------------------------------
def test_summary_counts_fresh_tokens_and_the_macs_schedule_macs_counts(model, inputs):
    sched = Schedule.uniform(model, num_steps=5, sparsity=0.75)
    apply_token_cache(model, sched)
    assert token_cache_summary(model).steps == 0 and "no trajectory" in str(token_cache_summary(model))
    run_loop(model, inputs, [900, 700, 500])  # a trajectory in progress is reported as it stands
    assert token_cache_summary(model).steps == 3
    run_loop(model, inputs)
    summary = token_cache_summary(model)
    n = (model.config.sample_size // 2) ** 2
    units = len(cacheable_units(model))
    assert summary.steps == 5 and summary.total_tokens == units * n and summary.context == "default"
    assert summary.fresh_tokens == [units * n] + [units * fresh_tokens(0.75, n)] * 4
    assert summary.fresh_fraction == pytest.approx((1 + 4 * 0.25) / 5)
    macs = sched.macs(model, **inputs)
    assert summary.macs_saved == macs["dense"] - macs["cached"] > 0
    assert "5 steps" in str(summary) and "GMACs saved" in str(summary)
    remove_token_cache(model)
    with pytest.raises(RuntimeError, match="No token cache"):
        token_cache_summary(model)


@pytest.mark.parametrize("backbone", ["flux", "wan"])
def test_summary_macs_on_joint_and_rotary_backbones(backbone):
    model = build_transformer(backbone, "tiny")
    inputs = example_inputs(model)
    sched = Schedule.uniform(model, num_steps=5, sparsity=0.5)
    apply_token_cache(model, sched)
    run_loop(model, inputs, FLOW_TIMESTEPS[backbone])
    macs = sched.macs(model, **dict(inputs, timestep=torch.tensor([FLOW_TIMESTEPS[backbone][0]])))
    assert token_cache_summary(model).macs_saved == macs["dense"] - macs["cached"] > 0


# --- selectors: a registry --------------------------------------------------------------------------------------
def test_a_registered_selector_is_one_class(model, inputs):
    @register_selector
    class LastChannelSelector(TokenSelector):
        name = "last_channel"

        def base_score(self, x, state, unit):
            return x[..., -1].float()

    try:
        with pytest.raises(ValueError, match="Unknown selector 'x'; choose one of .*'last_channel'"):
            apply_token_cache(model, Schedule.uniform(model, 5, 0.5), selector="x")
        dense = run_loop(model, inputs)
        apply_token_cache(model, Schedule.uniform(model, 5, 0.0), selector=SelectorConfig(name="last_channel"))
        assert max_diff(dense, run_loop(model, inputs)) <= 1e-6  # sparsity 0 stays exact
        remove_token_cache(model)
        controller = apply_token_cache(model, Schedule.uniform(model, 5, 0.5), selector="last_channel")
        assert type(controller.selector) is LastChannelSelector and controller.selector.bonus == 0.0
        assert all(torch.isfinite(o).all() for o in run_loop(model, inputs))
        with pytest.raises(ValueError, match="already registered"):
            register_selector(type("Other", (TokenSelector,), {"name": "last_channel"}))
    finally:
        SELECTORS.pop("last_channel", None)
    with pytest.raises(ValueError, match="needs a `name`"):
        register_selector(type("Nameless", (TokenSelector,), {}))


def test_selectors_declare_what_they_need():
    need = {name: (cls.reads_attention, cls.needs_inputs, cls.side_effects) for name, cls in SELECTORS.items()}
    assert need["toca"] == (True, False, False) and need["similarity"] == (False, True, False)
    assert need["random"] == (False, False, True) and need["norm"] == (False, False, False)


def test_the_runtime_never_branches_on_a_selector_name():
    names = "|".join(SELECTORS)
    pattern = re.compile(rf"""(==|!=|\bin)\s*\(?["']({names})["']|["']({names})["']\s*(==|!=)""")
    for path in (ROOT / "diffsparse" / "cache").rglob("*.py"):
        assert not pattern.search(path.read_text()), path


# --- the public surface -----------------------------------------------------------------------------------------
def test_internals_are_not_public():
    internals = {"set_soft_choice", "trajectory_replay", "token_cache_paused", "token_cache_controller"}
    for module in (diffsparse, diffsparse.cache):
        assert not internals & set(module.__all__)
        assert all(hasattr(module, name) for name in module.__all__)
    assert {"TokenCacheConfig", "enable_token_cache", "disable_token_cache", "token_cache_summary"} <= set(
        diffsparse.__all__
    )


# --- diffusers' own caches ----------------------------------------------------------------------------------------
def test_a_model_with_a_diffusers_cache_is_refused(model):
    _pab(model)
    with pytest.raises(RuntimeError, match=r"already has a diffusers cache \(PyramidAttentionBroadcastHook.*"):
        apply_token_cache(model, Schedule.uniform(model, num_steps=3, sparsity=0.5))
    assert token_cache_controller(model) is None


def test_a_diffusers_cache_added_later_is_refused_at_the_first_forward(model, inputs):
    controller = apply_token_cache(model, Schedule.uniform(model, num_steps=5, sparsity=0.5))
    _pab(model)
    with pytest.raises(RuntimeError, match="token cache cannot run: the model already has a diffusers cache"):
        run_loop(model, inputs)
    assert all(s.step == -1 and not s.cache for s in controller.states.values())  # nothing of it kept


@pytest.mark.parametrize("backbone", ["flux", "wan"])
def test_enable_cache_and_the_token_cache_exclude_each_other(backbone):
    model = build_transformer(backbone, "tiny")
    inputs = example_inputs(model)
    sched = Schedule.uniform(model, num_steps=5, sparsity=0.5)
    model.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(RuntimeError, match="FirstBlockCacheConfig.*disable_cache"):
        apply_token_cache(model, sched)
    model.disable_cache()
    dense = run_loop(model, inputs, FLOW_TIMESTEPS[backbone])
    apply_token_cache(model, sched)
    cached = run_loop(model, inputs, FLOW_TIMESTEPS[backbone])
    model.enable_cache(TaylorSeerCacheConfig())
    with pytest.raises(RuntimeError, match="TaylorSeerCacheConfig"):
        run_loop(model, inputs, FLOW_TIMESTEPS[backbone])
    model.disable_cache()
    assert max_diff(cached, run_loop(model, inputs, FLOW_TIMESTEPS[backbone])) == 0.0
    remove_token_cache(model)
    assert max_diff(dense, run_loop(model, inputs, FLOW_TIMESTEPS[backbone])) == 0.0


# --- the guide ----------------------------------------------------------------------------------------------------
def guide_blocks(section: str = "Use it") -> list[str]:
    text = (ROOT / "docs" / "guides" / "apply.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_the_guide_examples_do_what_they_say(tmp_path, monkeypatch, capsys):
    """tests/test_docs.py runs every block as written; here, in one process, what each one claims."""
    blocks = guide_blocks()
    assert len(blocks) == 4
    monkeypatch.chdir(tmp_path)
    namespace = {}
    try:
        for block in blocks:
            exec(compile(block, "docs/guides/apply.md", "exec"), namespace)
    finally:
        SELECTORS.pop("mean", None)
    assert Schedule.load("/tmp/s.json") == Schedule.uniform(namespace["units"], num_steps=20, sparsity=0.5)
    assert Path("/tmp/s.png").is_file() and len(namespace["images"]) == 2
    assert namespace["fc"].forecast.any() and namespace["partial"].forecast[1:].all()
    assert "token cache (default): 20 steps" in capsys.readouterr().out
    assert _hookless(namespace["pipe"].transformer)

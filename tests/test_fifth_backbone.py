"""Adding a backbone is one file: `fifth_backbone.py` registers a fifth tiny backbone (a DiT subclass with its own
row), and the token cache, MAC accounting, our sampling loop and its stock pipeline run on it unchanged."""

import pytest
import torch
from conftest import call_pipeline, max_diff, run_loop
from diffusers import DDIMScheduler
from fifth_backbone import FIFTH, FifthDiT, build_fifth, fifth_example_inputs

from diffsparse import Schedule, apply_token_cache, cacheable_units, remove_token_cache
from diffsparse.backbones import (
    BACKBONES,
    BackboneSpec,
    backbone_for,
    build_transformer,
    example_inputs,
    register_backbone,
    tiny_pipeline,
)
from diffsparse.cache import SELECTORS
from diffsparse.models.sampling import initial_noise, sample


@pytest.fixture
def model() -> FifthDiT:
    return build_transformer("fifth", "tiny")


@pytest.fixture
def inputs(model) -> dict:
    return example_inputs(model, batch=2)


def test_the_row_is_registered_and_found_before_its_parent_class(model):
    assert BACKBONES["fifth"] is FIFTH and backbone_for(model) is FIFTH
    assert backbone_for(build_transformer("dit", "tiny")).name == "dit"  # DiT itself keeps its own row
    assert cacheable_units(model) == [f"transformer_blocks.{b}.{c}" for b in range(2) for c in ("attn1", "ff")]
    assert register_backbone(FIFTH) is FIFTH  # registering the same row again changes nothing
    other = BackboneSpec(
        "fifth_copy", ("FifthDiT",), FIFTH.block_lists, FIFTH.token_grid, build_fifth, fifth_example_inputs
    )
    with pytest.raises(ValueError, match="already belong to"):
        register_backbone(other)


@pytest.mark.parametrize("selector", [None, *SELECTORS])
def test_sparsity_zero_is_exactly_dense_in_a_loop(model, inputs, selector):
    dense = run_loop(model, inputs)
    options = {} if selector is None else {"selector": selector}  # None: the row's default selector
    apply_token_cache(model, Schedule.uniform(cacheable_units(model), 5, 0.0), **options)
    assert max_diff(dense, run_loop(model, inputs)) == 0.0


def test_sparsity_zero_is_exactly_dense_in_our_sampling_loop(model):
    labels, noise = torch.tensor([1, 3]), initial_noise(2, (4, 8, 8), seed=0)

    def run():
        with torch.no_grad():
            return sample(model, DDIMScheduler(), labels, noise, 4, guidance_scale=1.5)

    dense = run()
    apply_token_cache(model, Schedule.uniform(cacheable_units(model), 4, 0.0))
    assert torch.equal(run(), dense)


def test_sparsity_zero_is_exactly_dense_in_its_stock_pipeline():
    pipe = tiny_pipeline("fifth")
    pipe.set_progress_bar_config(disable=True)
    dense = call_pipeline(pipe)
    apply_token_cache(pipe.transformer, Schedule.uniform(cacheable_units(pipe.transformer), 4, 0.0))
    assert torch.equal(call_pipeline(pipe), dense)


@pytest.mark.parametrize("sparsity", [0.5, 0.75])
def test_partial_sparsity_runs_saves_macs_and_removes_cleanly(model, inputs, sparsity):
    dense = run_loop(model, inputs)
    schedule = Schedule.uniform(cacheable_units(model), 5, sparsity)
    macs = schedule.macs(model, **inputs)
    apply_token_cache(model, schedule)
    cached = run_loop(model, inputs)
    assert all(torch.isfinite(c).all() for c in cached)
    assert max_diff(dense[:1], cached[:1]) <= 1e-5  # step 0 computes everything
    assert max_diff(dense[1:], cached[1:]) > 1e-4
    assert macs["reduction"] > 1.2
    remove_token_cache(model)
    assert max_diff(dense, run_loop(model, inputs)) == 0.0

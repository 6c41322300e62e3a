"""A block whose units all reuse every token at a step is not run: its output is put together from theirs
(`BlockList.reused`), bit for bit the block's own. At a step where its MLP recomputes some tokens, the MLP's norm
and modulation run on those tokens only (`BlockList.fresh_mlp`), again bit for bit."""

import numpy as np
import pytest
import torch
from conftest import run_loop
from diffusers.models.attention import BasicTransformerBlock

from diffsparse import Schedule, apply_token_cache, cacheable_units, remove_token_cache
from diffsparse.backbones.basic_block import fresh_mlp_basic_block, reused_basic_block
from diffsparse.cache import TokenCacheConfig


def _schedules(units: list[str]) -> dict[str, Schedule]:
    """Whole-step copies and forecasts, blocks reused beside blocks that compute, and a random grid."""
    every = np.ones((5, len(units)))
    every[0] = 0.0
    per_block = len(units) // 2  # the tiny models have two blocks
    mixed = every.copy()
    mixed[2, :per_block] = 0.5  # block 0 partial, block 1 reused
    mixed[3, per_block] = 0.0  # one unit of block 1 computes
    rng = np.random.default_rng(0)
    grid = rng.choice([0.0, 0.5, 1.0], size=(5, len(units)), p=[0.2, 0.2, 0.6])
    grid[0] = 0.0
    return {
        "copy": Schedule(every, units, {}),
        "forecast": Schedule(every, units, {}).with_forecast(True),
        "mixed": Schedule(mixed, units, {}).with_forecast(True),
        "random": Schedule(grid, units, {}, rng.random(grid.shape) < 0.5),  # each reuse copies or forecasts
    }


@pytest.mark.parametrize("case", ["copy", "forecast", "mixed", "random"])
def test_skipping_blocks_changes_no_output_bit(model, inputs, case):
    schedule = _schedules(cacheable_units(model))[case]
    outs = []
    for skip in (False, True):
        apply_token_cache(model, schedule, skip_blocks=skip)
        outs.append(run_loop(model, inputs))
        remove_token_cache(model)
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))


def test_a_reused_block_runs_none_of_its_layers(model, inputs):
    units = cacheable_units(model)
    schedule = _schedules(units)["mixed"]
    calls: dict[int, int] = {}
    for b, block in enumerate(model.transformer_blocks):
        block.norm1.register_forward_hook(lambda *_, b=b: calls.__setitem__(b, calls.get(b, 0) + 1))
    apply_token_cache(model, schedule)
    run_loop(model, inputs)
    # Block 0 computes at steps 0 and 2, block 1 at steps 0 and 3; every other step reuses both blocks whole.
    assert calls == {0: 2, 1: 2}
    remove_token_cache(model)
    calls.clear()
    apply_token_cache(model, schedule, skip_blocks=False)
    run_loop(model, inputs)
    assert calls == {0: 5, 1: 5}


def _rows_normed_for_the_mlp(model, inputs, schedule, selector) -> list[int]:
    """How many tokens the MLP's norm of block 0 saw at each step (PixArt's is `norm2`, DiT's `norm3`)."""
    block = model.transformer_blocks[0]
    norm = block.norm2 if block.norm_type == "ada_norm_single" else block.norm3
    seen = []
    handle = norm.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[1]))
    apply_token_cache(model, schedule, selector=selector)
    try:
        run_loop(model, inputs)
    finally:
        remove_token_cache(model)
        handle.remove()
    return seen


@pytest.mark.parametrize("selector", ["toca", "random", "norm", "similarity"])
def test_a_partial_mlp_norms_only_its_fresh_tokens_when_the_selector_reads_no_values(model, inputs, selector):
    units = cacheable_units(model)
    grid = np.zeros((5, len(units)))
    grid[1:, units.index("transformer_blocks.0.ff")] = 0.5  # block 0's MLP recomputes half its tokens after step 0
    schedule = Schedule(grid, units, {})
    n = model.pos_embed(inputs["hidden_states"]).shape[1]
    seen = _rows_normed_for_the_mlp(model, inputs, schedule, selector)
    reads_values = selector in ("norm", "similarity")  # they score the MLP's own input: it is normed in full
    assert seen == [n] * 5 if reads_values else seen == [n] + [n // 2] * 4
    apply_token_cache(model, schedule, selector=selector, skip_blocks=False)  # the runner off: the stock block
    stock = run_loop(model, inputs)
    remove_token_cache(model)
    apply_token_cache(model, schedule, selector=selector)
    assert all(torch.equal(a, b) for a, b in zip(stock, run_loop(model, inputs), strict=True))
    remove_token_cache(model)


@pytest.mark.parametrize("norm_type", ["ada_norm_zero", "ada_norm_single"])
def test_the_fresh_mlp_block_is_the_stock_block_when_the_mlp_takes_every_row(norm_type):
    """With an MLP that prepares and computes every row, the runner must give the block's own output bit for bit:
    with cross-attention, class labels or an adaLN-single timestep, and a key mask that hides some text tokens."""
    torch.manual_seed(0)
    block = BasicTransformerBlock(
        32,
        2,
        16,
        cross_attention_dim=24,
        norm_type=norm_type,
        num_embeds_ada_norm=10 if norm_type == "ada_norm_zero" else None,
    ).eval()
    x, text = torch.randn(2, 6, 32), torch.randn(2, 5, 24)
    mask = torch.tensor([[0.0, 0, 0, -1e4, -1e4], [0, 0, 0, 0, -1e4]])[:, None]  # additive, as diffusers passes it
    inputs = {"encoder_hidden_states": text, "encoder_attention_mask": mask}
    if norm_type == "ada_norm_zero":
        inputs |= {"timestep": torch.tensor([5, 5]), "class_labels": torch.tensor([1, 2])}
    else:
        inputs |= {"timestep": torch.randn(2, 6 * 32)}
    with torch.no_grad():
        stock = block(x, **inputs)
        fresh = fresh_mlp_basic_block(block, x, inputs, mlp=lambda stream, prepare: block.ff(prepare(stream)))
    assert torch.equal(fresh, stock)


def test_blocks_it_does_not_cover_run_as_usual():
    torch.manual_seed(0)
    plain = BasicTransformerBlock(32, 2, 16, norm_type="layer_norm").eval()
    x = torch.randn(2, 4, 32)
    outputs = {"attn1": torch.randn(2, 4, 32), "ff": torch.randn(2, 4, 32)}
    assert reused_basic_block(plain, x, outputs, {}) is None
    zero = BasicTransformerBlock(32, 2, 16, norm_type="ada_norm_zero", num_embeds_ada_norm=10).eval()
    inputs = {"timestep": torch.tensor([5, 5]), "class_labels": torch.tensor([1, 2])}
    assert reused_basic_block(zero, x, outputs, inputs) is not None
    assert reused_basic_block(zero, x, {"attn1": outputs["attn1"]}, inputs) is None  # the MLP is not a unit
    gligen = {**inputs, "cross_attention_kwargs": {"gligen": {}}}
    assert reused_basic_block(zero, x, outputs, gligen) is None
    for block, args in ((plain, {}), (zero, gligen)):
        assert fresh_mlp_basic_block(block, x, args, mlp=None) is None
    zero.set_chunk_feed_forward(2)  # chunked feed-forward: the block's own loop
    assert fresh_mlp_basic_block(zero, x, inputs, mlp=None) is None
    cross_only = BasicTransformerBlock(32, 2, 16, cross_attention_dim=32, only_cross_attention=True,
                                       norm_type="ada_norm_zero", num_embeds_ada_norm=10).eval()  # fmt: skip
    assert fresh_mlp_basic_block(cross_only, x, inputs, mlp=None) is None


def test_skip_blocks_must_be_a_bool():
    with pytest.raises(ValueError, match="skip_blocks"):
        TokenCacheConfig(skip_blocks="yes")

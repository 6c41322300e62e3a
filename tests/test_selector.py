import pytest
import torch
import torch.nn.functional as F

from diffsparse.backbones import build_transformer
from diffsparse.backbones.registry import BACKBONES
from diffsparse.cache.attention import attention_with_signals
from diffsparse.cache.selectors import SelectorConfig, make_selector, spatial_bonus
from diffsparse.cache.state import TrajectoryState


def test_attention_with_signals_matches_the_module():
    model = build_transformer("pixart", "tiny")
    block = model.transformer_blocks[0]
    x = torch.randn(2, 16, 16)
    text = torch.randn(2, 5, 16)
    with torch.no_grad():
        out, influence = attention_with_signals(block.attn1, x, x, None, "influence")
        torch.testing.assert_close(out, block.attn1(x), rtol=1e-5, atol=1e-6)
        # Each query's attention sums to 1, so the attention each token receives averages to 1.
        torch.testing.assert_close(influence.mean(dim=1), torch.ones(2))
        out, entropy = attention_with_signals(block.attn2, x, text, None, "entropy")
        torch.testing.assert_close(out, block.attn2(x, encoder_hidden_states=text), rtol=1e-5, atol=1e-6)
        assert ((entropy >= 0) & (entropy <= 1 + 1e-6)).all()


def test_attention_signals_respect_the_mask():
    model = build_transformer("pixart", "tiny")
    attn = model.transformer_blocks[0].attn2
    x, text = torch.randn(1, 16, 16), torch.randn(1, 4, 16)
    mask = torch.tensor([[0.0, 0.0, -10000.0, -10000.0]]).unsqueeze(1)  # keep the first two text tokens
    with torch.no_grad():
        out, entropy = attention_with_signals(attn, x, text, mask, "entropy")
        torch.testing.assert_close(out, attn(x, encoder_hidden_states=text, attention_mask=mask), rtol=1e-5, atol=1e-6)
    assert (entropy <= torch.log(torch.tensor(2.0)) / torch.log(torch.tensor(4.0)) + 1e-5).all()


def test_spatial_bonus_rewards_one_token_per_tile():
    score = torch.randn(3, 64)
    boosted = spatial_bonus(score, (8, 8), 2, 0.6)
    gained = (boosted - score) > 0.5
    assert gained.sum(dim=1).tolist() == [16, 16, 16]
    tiles = score.view(3, 4, 2, 4, 2).amax(dim=(2, 4))
    expected = score.view(3, 1, 8, 8) == F.interpolate(tiles.unsqueeze(1), scale_factor=2, mode="nearest")
    assert torch.equal(gained, expected.view(3, 64))
    # A grid that does not tile evenly takes the pooling path and still gives one winner per (partial) tile.
    plain = torch.randn(1, 25)
    odd = spatial_bonus(plain, (5, 5), 2, 1.0)
    assert int(((odd - plain) > 0.5).sum()) == 9  # 3 x 3 tiles, the last row and column are half tiles


def _state(step=3, n=16, b=2):
    state = TrajectoryState(step=step, grid=(4, 4))
    state.last_fresh[0] = torch.zeros(b, n, dtype=torch.int32)
    return state


class _Unit:
    index, block = 0, 0


def test_reuse_count_rotates_tokens():
    sel = make_selector(SelectorConfig(name="norm", reuse_weight=10.0), BACKBONES["dit"].selector_defaults)
    state = _state()
    x = torch.randn(2, 16, 8)
    state.last_fresh[0][:, :4] = 3  # the first four tokens were just computed
    idx = sel.select(x, 12, state, _Unit())
    assert not (idx < 4).any()


def test_norm_selector_picks_the_largest_tokens():
    sel = make_selector(SelectorConfig(name="norm", reuse_weight=0.0), {})
    x = torch.randn(2, 16, 8)
    x[:, 5] *= 100
    idx = sel.select(x, 1, _state(), _Unit())
    assert idx.flatten().tolist() == [5, 5]


def test_random_selector_is_seeded():
    a = make_selector(SelectorConfig(name="random", seed=3), {})
    b = make_selector(SelectorConfig(name="random", seed=3), {})
    x = torch.randn(2, 16, 8)
    assert torch.equal(a.select(x, 4, _state(), _Unit()), b.select(x, 4, _state(), _Unit()))


def test_toca_defaults_follow_the_paper():
    dit = make_selector("toca", BACKBONES["dit"].selector_defaults)
    assert (dit.self_attn_weight, dit.cross_attn_weight, dit.bonus, dit.bonus_kernel) == (1.0, 0.0, 0.6, 2)
    assert dit.reuse_weight == pytest.approx(0.25 / 3)
    pixart = make_selector("toca", BACKBONES["pixart"].selector_defaults)
    assert (pixart.self_attn_weight, pixart.cross_attn_weight, pixart.bonus, pixart.bonus_kernel) == (0, 1, 0.4, 4)


def test_a_schedule_runs_with_the_selector_it_records_unless_told_otherwise():
    from diffsparse import Schedule, apply_token_cache, remove_token_cache
    from diffsparse.cache.hooks import token_cache_controller

    model = build_transformer("dit", size="tiny", sample_size=8)
    plain = Schedule.uniform(model, num_steps=4, sparsity=0.5)
    learned = Schedule(plain.grid, plain.units, meta={"selector": "norm"})
    for schedule, options, expected in ((plain, {}, "toca"), (learned, {}, "norm"),
                                        (learned, {"selector": "random"}, "random")):  # fmt: skip
        apply_token_cache(model, schedule, **options)
        assert token_cache_controller(model).selector.name == expected
        remove_token_cache(model)

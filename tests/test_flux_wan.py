"""The token cache on FLUX (joint and single-stream blocks) and Wan2.1 (rotary self-attention on a video grid)."""

import numpy as np
import pytest
import torch
from conftest import call_flow_pipeline, max_diff, run_loop

from diffsparse import Schedule, apply_token_cache, cacheable_units, remove_token_cache
from diffsparse.accounting.macs import flop_counter
from diffsparse.backbones import find_units
from diffsparse.backbones.flux import build_flux, flux_example_inputs, pack
from diffsparse.backbones.wan import build_wan, wan_example_inputs
from diffsparse.cache import SELECTORS
from diffsparse.cache.hooks import token_cache_controller
from diffsparse.cache.rows import flat_rows
from diffsparse.cache.runners import joint_attention, rope_self_attention, single_stream_branch
from diffsparse.cache.selectors import spatial_bonus
from diffsparse.models.sampling import initial_noise, make_scheduler, sample

# FLUX takes timesteps in [0, 1] (its pipeline divides by 1000); Wan the train timesteps.
TIMESTEPS = {"flux": [0.9, 0.7, 0.5, 0.3, 0.1], "wan": [900, 700, 500, 300, 100]}


@pytest.fixture(params=["flux", "wan"])
def backbone(request) -> str:
    """The flow-matching backbones; `model` and `inputs` come from conftest's factory."""
    return request.param


def loop(model, inputs, backbone, steps=5):
    return run_loop(model, inputs, TIMESTEPS[backbone][:steps])


def test_units_follow_the_registry(model, backbone):
    if backbone == "flux":
        dual = [f"transformer_blocks.0.{c}" for c in ("attn", "attn_context", "ff", "ff_context")]
        assert cacheable_units(model) == [*dual, "single_transformer_blocks.0"]
    else:
        assert cacheable_units(model) == [f"blocks.{b}.{c}" for b in range(2) for c in ("attn1", "attn2", "ffn")]


@pytest.mark.parametrize("selector", SELECTORS)
def test_sparsity_zero_is_exactly_dense_in_a_loop(model, inputs, backbone, selector):
    sched = Schedule.uniform(cacheable_units(model), 5, 0.0)
    if selector == "toca" and backbone == "wan":  # rotary self-attention exposes no map: a clear refusal
        with pytest.raises(ValueError, match="selector='norm'"):
            apply_token_cache(model, sched, selector=selector)
        return
    dense = loop(model, inputs, backbone)
    apply_token_cache(model, sched, selector=selector)
    assert max_diff(dense, loop(model, inputs, backbone)) <= 1e-6


def test_remove_gives_the_original_model_back(model, inputs, backbone):
    before = {name: set(m.__dict__) for name, m in model.named_modules()}
    dense = loop(model, inputs, backbone)
    apply_token_cache(model, Schedule.uniform(cacheable_units(model), 5, 0.5))
    assert max_diff(dense, loop(model, inputs, backbone)) > 1e-4
    remove_token_cache(model)
    assert {name: set(m.__dict__) for name, m in model.named_modules()} == before
    assert not any(hasattr(m, "_diffusers_hook") for m in model.modules())
    assert max_diff(dense, loop(model, inputs, backbone)) == 0.0


def test_repeated_loops_agree_and_step_zero_is_dense(model, inputs, backbone):
    dense = loop(model, inputs, backbone)
    apply_token_cache(model, Schedule.uniform(cacheable_units(model), 5, 0.5))
    a = loop(model, inputs, backbone)
    b = loop(model, inputs, backbone)
    assert max_diff(a, b) == 0.0
    assert max_diff(dense[:1], a[:1]) <= 1e-6
    assert all(torch.isfinite(x).all() for x in a)


def _full_rows(b, n):
    idx = torch.arange(n).expand(b, n)
    return idx, flat_rows(idx, n)


def _some_rows(b, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b)])
    return idx, flat_rows(idx, n)


def _rows_of(x, idx):
    return torch.stack([x[i, idx[i]] for i in range(len(idx))])


def test_rotary_self_attention_gives_the_dense_rows_of_the_fresh_tokens():
    model = build_wan("tiny")
    inputs = wan_example_inputs(model)
    attn = model.blocks[0].attn1
    rotary = model.rope(inputs["hidden_states"])
    n = rotary[0].shape[1]
    x = torch.randn(2, n, attn.to_q.in_features)
    with torch.no_grad():
        dense = attn(x, None, None, rotary)
        idx, rows = _some_rows(2, n, n // 3)
        fresh = rope_self_attention(attn, x, idx, rows, rotary)
    # Each fresh token keeps its own rotary position: its output is exactly its row of the dense output.
    torch.testing.assert_close(fresh, _rows_of(dense, idx), rtol=1e-5, atol=1e-5)


def _flux_rotary(model, inputs):
    ids = torch.cat([inputs["txt_ids"], inputs["img_ids"]])
    return model.pos_embed(ids)


def test_joint_attention_gives_the_dense_rows_of_each_streams_fresh_tokens():
    model = build_flux("tiny")
    inputs = flux_example_inputs(model)
    attn = model.transformer_blocks[0].attn
    rotary = _flux_rotary(model, inputs)
    n, m, d = inputs["img_ids"].shape[0], inputs["txt_ids"].shape[0], attn.to_q.in_features
    img, txt = torch.randn(2, n, d), torch.randn(2, m, d)
    with torch.no_grad():
        dense_img, dense_txt = attn(img, txt, image_rotary_emb=rotary)
        img_rows, txt_rows = _some_rows(2, n, n // 4), _some_rows(2, m, m // 2, seed=1)
        out_img, out_txt = joint_attention(attn, img, txt, img_rows, txt_rows, rotary)
        only_img, no_txt = joint_attention(attn, img, txt, _full_rows(2, n), None, rotary)
    torch.testing.assert_close(out_img, _rows_of(dense_img, img_rows[0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_txt, _rows_of(dense_txt, txt_rows[0]), rtol=1e-5, atol=1e-5)
    # Text queries dropped, text keys and values kept: the image stream is unchanged.
    assert no_txt is None
    torch.testing.assert_close(only_img, dense_img, rtol=1e-5, atol=1e-5)


def test_single_stream_branch_gives_the_dense_rows():
    model = build_flux("tiny")
    inputs = flux_example_inputs(model)
    block = model.single_transformer_blocks[0]
    rotary = _flux_rotary(model, inputs)
    n, m, d = inputs["img_ids"].shape[0], inputs["txt_ids"].shape[0], block.proj_mlp.in_features
    img, txt, temb = torch.randn(2, n, d), torch.randn(2, m, d), torch.randn(2, d)
    with torch.no_grad():
        txt_out, img_out = block(img, txt, temb, image_rotary_emb=rotary)
        idx, rows = _some_rows(2, n, n // 2)
        txt_branch, img_branch = single_stream_branch(block, img, txt, temb, rotary, (idx, rows))
        txt_only, nothing = single_stream_branch(block, img, txt, temb, rotary, None)
    torch.testing.assert_close(txt + txt_branch, txt_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_rows_of(img, idx) + img_branch, _rows_of(img_out, idx), rtol=1e-5, atol=1e-5)
    assert nothing is None
    torch.testing.assert_close(txt + txt_only, txt_out, rtol=1e-5, atol=1e-5)


def test_partial_units_really_compute_fewer_tokens(model, inputs, backbone):
    """The query projection of every unit sees only its fresh tokens (text tokens always, in single blocks)."""
    seen: dict[str, list[int]] = {}
    for u in find_units(model):
        m = u.module
        if u.kind == "parallel_block":
            watch = m.proj_mlp
        elif u.kind == "mlp":
            watch = next(x for x in m.modules() if isinstance(x, torch.nn.Linear))
        else:
            watch = m.add_q_proj if u.stream == "text" else m.to_q
        watch.register_forward_pre_hook(lambda mod, a, u=u: seen.setdefault(u.name, []).append(a[0].shape[1]))
    apply_token_cache(model, Schedule.uniform(cacheable_units(model), 5, 0.75))
    loop(model, inputs, backbone)
    x = inputs["hidden_states"]
    n = x.shape[1] if backbone == "flux" else x[0, 0].numel() // 4
    m = inputs["encoder_hidden_states"].shape[1]
    for u in find_units(model):
        tokens = m if u.stream == "text" else n
        extra = m if u.kind == "parallel_block" else 0
        assert seen[u.name] == [tokens + extra] + [tokens // 4 + extra] * 4, (u.name, seen[u.name])


def test_trajectory_macs_match_the_flop_counter(model, inputs, backbone):
    sched = Schedule.uniform(cacheable_units(model), 5, 0.5)
    predicted = sched.macs(model, **inputs)
    apply_token_cache(model, sched)
    with torch.no_grad(), flop_counter() as counter:
        loop(model, inputs, backbone)
    assert predicted["cached"] == pytest.approx(counter.get_total_flops() // 2, rel=0.02)
    assert predicted["reduction"] > 1.3


def test_spatial_bonus_tiles_each_frame_of_a_video_grid():
    score = torch.zeros(1, 2 * 4 * 4)
    score[0, 5] = 1.0  # frame 0, row 1, col 1: the winner of its 2 x 2 tile
    boosted = spatial_bonus(score, (2, 4, 4), 2, 0.5)
    # Frame 0: tile (0, 0) has one winner; the other tiles (all zero) tie, so all their tokens win.
    assert boosted[0, 5] == 1.5 and boosted[0, 0] == 0.0 and boosted[0, 2] == 0.5
    assert (boosted[0, 16:] == 0.5).all()  # frame 1 is tiled on its own


def test_flux_grid_comes_from_the_position_ids(model, inputs, backbone):
    controller = apply_token_cache(model, Schedule.uniform(cacheable_units(model), 5, 0.5))
    loop(model, inputs, backbone, steps=2)
    grid = next(iter(controller.states.values())).grid
    if backbone == "flux":
        assert grid == (int(inputs["img_ids"][:, 1].max()) + 1, int(inputs["img_ids"][:, 2].max()) + 1)
    else:
        assert grid == tuple(
            s // p for s, p in zip(inputs["hidden_states"].shape[2:], model.config.patch_size, strict=True)
        )
    assert token_cache_controller(model) is controller


def test_stock_pipelines_sparsity_zero_repeat_and_remove(flow_pipelines, backbone):
    pipe = flow_pipelines[backbone]
    units = cacheable_units(pipe.transformer)
    dense = call_flow_pipeline(pipe)
    apply_token_cache(pipe.transformer, Schedule.uniform(units, 4, 0.0))
    assert float((call_flow_pipeline(pipe) - dense).abs().max()) <= 1e-6
    remove_token_cache(pipe.transformer)
    controller = apply_token_cache(pipe.transformer, Schedule.uniform(units, 4, 0.5))
    contexts, begin = [], controller.begin_forward
    controller.begin_forward = lambda *a: contexts.append(a[-1].name if a[-1] is not None else None) or begin(*a)
    a, b = call_flow_pipeline(pipe), call_flow_pipeline(pipe)
    assert torch.equal(a, b)  # the second call does not see the first one's cache
    assert float((a - dense).abs().max()) > 1e-5
    assert all(s.step == -1 and not s.cache for s in controller.states.values())
    # Wan runs CFG as two calls per step, in the contexts "cond" and "uncond": one trajectory each (FLUX: "cond").
    assert set(contexts) == ({"cond", "uncond"} if backbone == "wan" else {"cond"})
    remove_token_cache(pipe.transformer)
    assert torch.equal(call_flow_pipeline(pipe), dense)


def test_our_flow_matching_loop_gives_the_stock_pipelines_latents(flow_pipelines, backbone):
    """The trainer's rollouts follow the same trajectory as the stock pipeline (same sigmas, packing, CFG).

    With the cache at sparsity 0: at partial levels Wan's pipeline runs the CFG halves as two calls, each with its
    own token choices, where our loop batches them and lets both halves pick the same tokens."""
    pipe = flow_pipelines[backbone]
    flux = backbone == "flux"
    shape = (4, 8, 8) if flux else (4, 2, 8, 8)
    noise = initial_noise(1, shape, seed=3)
    apply_token_cache(pipe.transformer, Schedule.uniform(cacheable_units(pipe.transformer), 4, 0.0))
    if flux:
        embeds, pooled, _ = pipe.encode_prompt("a photo of a cat", prompt_2=None, max_sequence_length=8)
        conditions, null, guidance = {"encoder_hidden_states": embeds, "pooled_projections": pooled}, None, 1.0
        stock = call_flow_pipeline(pipe, latents=pack(noise), output_type="latent")
        stock = stock.view(1, 4, 4, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, *shape)  # unpack
    else:
        embeds, negative = pipe.encode_prompt("a photo of a cat", negative_prompt="", max_sequence_length=8)
        conditions, null, guidance = {"encoder_hidden_states": embeds}, {"encoder_hidden_states": negative}, 5.0
        stock = call_flow_pipeline(pipe, latents=noise, output_type="latent")
    config = {**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__}
    with torch.no_grad():
        ours = sample(
            pipe.transformer, make_scheduler("flow", config), conditions, noise, 4, guidance, null_conditions=null
        )
    remove_token_cache(pipe.transformer)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)


def test_text_entropy_is_one_for_even_attention_and_near_zero_for_one_text_token():
    from diffsparse.cache.runners import text_entropy

    key = torch.zeros(2, 5, 3, 8)
    key[:, range(5), :, range(5)] = 1.0  # text token j along axis j, in every head
    assert torch.allclose(text_entropy(torch.zeros(2, 7, 3, 8), key), torch.ones(2, 7))
    focused = 100.0 * key[:, 2:3].expand(2, 7, 3, 8)  # every query points at text token 2
    assert text_entropy(focused, key).shape == (2, 7) and text_entropy(focused, key).max() < 0.05


def test_flux_toca_ranks_image_tokens_by_their_entropy_over_the_text(flow_pipelines):
    """selector='toca' on FLUX: the paper's weights; the entropy is computed on full steps (dual- and single-stream
    blocks, image tokens only) and changes which tokens are recomputed, against the norm selector."""
    from diffsparse.cache.selectors import ENTROPY

    pipe = flow_pipelines["flux"]
    units = cacheable_units(pipe.transformer)
    sched = Schedule(np.array([[0.0] * len(units)] + [[0.5] * len(units)] * 3), units)
    outputs, seen = {}, {}
    for selector in ("toca", "norm"):
        controller = apply_token_cache(pipe.transformer, sched, selector=selector)
        if selector == "toca":
            assert controller.selector.cross_attn_weight == 1.0 and controller.selector.self_attn_weight == 0.0
            original = controller.selector.select

            def spy(x, k, state, unit, original=original, seen=seen):
                seen.update({key: v.clone() for key, v in state.signals.items()})
                return original(x, k, state, unit)

            controller.selector.select = spy
        outputs[selector] = call_flow_pipeline(pipe, steps=4)
        remove_token_cache(pipe.transformer)
    assert {key for key in seen} == {(0, ENTROPY), (1, ENTROPY)}  # the dual-stream block, the single-stream one
    assert all(v.shape == (1, 16) and 0 < v.min() and v.max() <= 1 + 1e-6 for v in seen.values())
    assert not torch.equal(outputs["toca"], outputs["norm"])


@pytest.mark.parametrize("make", ["fora", "forecast_warmup"])
def test_whole_step_reuse_macs_are_exact(model, inputs, backbone, make):
    """Schedules that reuse whole steps: the MAC table's trajectory equals the flop counter's to the MAC. On FLUX
    that needs the joint attention's shared keys and values (skipped when both streams reuse) and the single-stream
    block's text rows (reused with its image tokens) counted where they run."""
    from diffsparse.allocate.baselines import fora, forecast_warmup

    units = cacheable_units(model)
    sched = fora(units, 5, 2) if make == "fora" else forecast_warmup(units, 5, 2, warmup=1)
    predicted = sched.macs(model, **inputs)
    apply_token_cache(model, sched)
    with torch.no_grad(), flop_counter() as counter:
        loop(model, inputs, backbone)
    assert predicted["cached"] == counter.get_total_flops() // 2
    assert predicted["reduction"] > 1.5


def test_flux_single_stream_block_does_no_work_when_it_reuses_every_image_token():
    model = build_flux("tiny")
    inputs = flux_example_inputs(model)
    block = model.single_transformer_blocks[0]
    calls = []
    for layer in (block.norm.linear, block.attn.to_k, block.proj_mlp):
        layer.register_forward_pre_hook(lambda mod, a: calls.append(a[0].shape[1] if a[0].ndim == 3 else 0))
    units = cacheable_units(model)
    grid = np.zeros((3, len(units)))
    grid[1:, units.index("single_transformer_blocks.0")] = 1.0
    sched = Schedule(grid, units, forecast=np.ones_like(grid, dtype=bool))
    apply_token_cache(model, sched)
    loop(model, inputs, "flux", steps=3)
    assert len(calls) == 3  # step 0 only: norm, keys, MLP; steps 1 and 2 forecast the whole branch


def test_flux_training_mode_with_forecast_actions_equals_inference():
    """Training mode's blend (the text rows of single-stream blocks included) reproduces the inference path for a
    one-hot choice that mixes partial steps, whole-unit copies and forecasts."""
    from diffsparse.allocate.baselines import toca
    from diffsparse.cache.control import set_soft_choice
    from diffsparse.levels import ACTIONS

    model, backbone = build_flux("tiny"), "flux"
    inputs = flux_example_inputs(model)
    units = cacheable_units(model)
    sched = toca(units, 5, fresh_ratio=0.5, interval=3)
    sched = Schedule(np.where(np.arange(5)[:, None] == 2, 1.0, sched.grid), units)  # step 2 reuses every token
    modes = np.zeros(sched.grid.shape, dtype=bool)
    modes[:, ::2] = True  # every other unit forecasts, the rest copy
    sched = sched.with_forecast(modes)
    h = torch.nn.functional.one_hot(torch.as_tensor(sched.action_indices()), len(ACTIONS)).float()
    apply_token_cache(model, sched, selector="norm")
    fast = loop(model, inputs, backbone)
    set_soft_choice(model, sched, h)
    blended = loop(model, inputs, backbone)
    set_soft_choice(model, sched, None)
    again = loop(model, inputs, backbone)
    assert max_diff(blended, fast) <= 1e-4
    assert max_diff(again, fast) == 0.0
    assert max_diff(fast, loop(remove_token_cache(model) or model, inputs, backbone)) > 1e-4  # not the dense model

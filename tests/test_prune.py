"""Stage-wise structural pruning: calibration, OBS / Wanda / LayerDrop orders, weight routing (a removable hook)
against physically pruned copies and stitching, and the presets. The Hydra task end to end: test_prune_task.py."""

import numpy as np
import pytest
import torch

from diffsparse import Schedule, apply_token_cache, remove_token_cache
from diffsparse.allocate.stages import StageSpace
from diffsparse.models.loading import load_model
from diffsparse.models.sampling import initial_noise, sample
from diffsparse.prune.calibration import (
    calibration_batches,
    collect_statistics,
    stage_of_timestep,
    stage_range,
    step_boundaries,
)
from diffsparse.prune.plan import (
    MOSAICDIFF_BOUNDARIES,
    MOSAICDIFF_PATTERN,
    PrunePlan,
    level_macs,
    mosaic_levels,
    saved_fraction,
    uniform_levels,
)
from diffsparse.prune.routing import (
    StitchedModel,
    WeightRouter,
    apply_pruning,
    parameter_bytes,
    pruned_copy,
    pruning_router,
    remove_pruning,
)
from diffsparse.prune.scores import damped_inverse, layerdrop_order, obs_prune, wanda_order
from diffsparse.prune.store import PruneStore, build_store
from diffsparse.prune.structures import prunable_layers, removed_count

BOUNDARIES = [600, 250]


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    return load_model("tiny")


@pytest.fixture(scope="module")
def stores(ref):
    return {
        m: build_store(ref, m, BOUNDARIES, samples=24, levels=8, max_level=6) for m in ("obs", "wanda", "layerdrop")
    }


def inputs(ref, t=700):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, *ref.sample_shape, generator=g)
    return dict(hidden_states=x, timestep=torch.full((4,), t), class_labels=torch.tensor([1, 2, 10, 10]))


def run(model, kwargs):
    with torch.no_grad():
        return model(**kwargs).sample


def test_structures_of_a_dit_are_heads_and_neurons(ref):
    layers = prunable_layers(ref.transformer)
    assert [(layer.name.rsplit(".", 1)[-1], layer.kind) for layer in layers] == [
        ("attn1", "heads"),
        ("ff", "neurons"),
    ] * 2
    attn = layers[0]
    assert attn.count == 2 and attn.width == 8 and attn.columns(torch.tensor([1])).tolist() == list(range(8, 16))
    assert [removed_count(level, 16, 4) for level in (0, 1, 2, 6, 10, 16)] == [0, 0, 1, 2, 3, 3]  # one always kept


def test_calibration_noises_into_the_stage_and_accumulates_x_transpose_x(ref):
    assert stage_of_timestep([999, 600, 599, 250, 249, 0], BOUNDARIES).tolist() == [0, 0, 1, 1, 2, 2]
    assert stage_range(1, BOUNDARIES, 1000) == (250, 599)
    batches = list(calibration_batches(ref, BOUNDARIES, 1, samples=10, batch_size=4))
    t = torch.cat([b["timestep"] for b in batches])
    assert len(t) == 20 and t.min() >= 250 and t.max() <= 599  # CFG pairs, all inside the stage
    assert (batches[0]["class_labels"][4:] == 10).all()  # second half: the null class
    seen = []
    layer = prunable_layers(ref.transformer)[1]
    handle = layer.consumer.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    try:
        stats = collect_statistics(ref.transformer, batches)
    finally:
        handle.remove()
    x = torch.cat(seen).double()
    assert torch.allclose(stats.hessians[layer.name], x.T @ x, rtol=1e-10)
    assert stats.samples == 10 and stats.block_cosine.shape == (2,)


def test_obs_update_lowers_the_output_error_on_calibration_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    w = torch.randn(16, 24, generator=g, dtype=torch.float64)
    h = x.T @ x
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(24, dtype=torch.float64)
    for width, count in ((1, 10), (4, 2)):
        order, kept = obs_prune(w, h, width, [count])
        assert sorted(order.tolist()) == list(range(24 // width))  # the removed ones first, then the rest
        cols = torch.ones(24, dtype=torch.bool)
        cols[(order[:count, None] * width + torch.arange(width)).reshape(-1)] = False
        with_update = ((x @ w.T - x[:, cols] @ kept[count].T) ** 2).sum()
        without = ((x @ w.T - x[:, cols] @ w[:, cols].T) ** 2).sum()
        assert with_update < 0.9 * without, (width, float(with_update), float(without))
        # the update is the least-squares optimum on the kept columns (under the damped Hessian)
        optimum = w @ damped[:, cols] @ torch.linalg.inv(damped[cols][:, cols])
        assert torch.allclose(kept[count], optimum, atol=1e-9)


def test_obs_survives_a_singular_hessian():
    hinv = damped_inverse(torch.zeros(6, 6))
    assert torch.isfinite(hinv).all()
    order, kept = obs_prune(torch.ones(3, 6), torch.zeros(6, 6), 2, [1, 2])
    assert kept[2].shape == (3, 2) and torch.isfinite(kept[2]).all()


def test_wanda_and_layerdrop_orders():
    w = torch.ones(6, 4)
    w[2:4] = 0.01  # the second of three 2-row structures is nearly zero
    assert wanda_order([w], [torch.ones(4)], 2)[0] == 1
    sq = torch.tensor([1.0, 1.0, 1.0, 1e-6])  # a dead input feature makes weights on it unimportant
    w2 = torch.zeros(3, 4)
    w2[0, 3], w2[1, 0], w2[2, 1] = 10.0, 1.0, 2.0
    assert wanda_order([w2], [sq], 1).tolist() == [0, 1, 2]
    assert layerdrop_order(torch.tensor([0.2, 0.9, 0.5])).tolist() == [1, 2, 0]


def test_level_0_is_the_dense_model_exactly_and_removal_restores_it(ref, stores):
    model, kwargs = ref.transformer, inputs(ref)
    dense = run(model, kwargs)
    params = {name: p for name, p in model.named_parameters()}
    labels, noise = torch.tensor([3, 7]), initial_noise(2, ref.sample_shape, 0)
    with torch.no_grad():
        dense_sample = sample(model, ref.scheduler(), labels, noise, 6, 1.25)
    for store in stores.values():
        router = WeightRouter(model, store)
        router.route(1, 0)
        assert torch.equal(run(model, kwargs), dense)
        apply_pruning(model, store, [0, 0, 0])
        with torch.no_grad():
            assert torch.equal(sample(model, ref.scheduler(), labels, noise, 6, 1.25), dense_sample)
        remove_pruning(model)
        apply_pruning(model, store, [2, 1, 1] if store.method == "layerdrop" else [3, 2, 1])
        assert not torch.allclose(run(model, kwargs), dense)
        remove_pruning(model)
        assert {name: p for name, p in model.named_parameters()}.keys() == params.keys()
        assert all(p is params[name] for name, p in model.named_parameters())  # the very same tensors
        assert all(m.heads == 2 for m in model.modules() if hasattr(m, "heads"))
        assert torch.equal(run(model, kwargs), dense)


@pytest.mark.parametrize("method", ["obs", "wanda", "layerdrop"])
def test_routed_weights_equal_a_physically_pruned_copy(ref, stores, method):
    store, model = stores[method], ref.transformer
    router = WeightRouter(model, store)
    dense_bytes = parameter_bytes(model)
    for stage in range(3):
        for level in (1, 3, 6) if method != "layerdrop" else (1, 2):
            kwargs = inputs(ref)
            copy = pruned_copy(model, store, stage, level)
            router.route(stage, level)
            try:
                routed = run(model, kwargs)
            finally:
                router.restore()
            assert torch.equal(routed, run(copy, kwargs)), (stage, level)
            assert parameter_bytes(copy) < dense_bytes  # the copy is really smaller
    # levels map to what they remove: OBS / Wanda thin every layer, LayerDrop drops whole blocks
    router.route(0, 2)
    try:
        if method == "layerdrop":
            assert all(type(b).__name__ == "SkippedBlock" for b in model.transformer_blocks)
        else:
            ff = prunable_layers(model)[1]
            count = store.counts[ff.name]
            assert ff.consumer.weight.shape[1] == count - removed_count(2, 8, count) == 48
    finally:
        router.restore()


@pytest.mark.parametrize("method", ["obs", "wanda"])
def test_a_pruned_layer_is_the_dense_layer_with_the_removed_structures_zeroed(ref, stores, method):
    """Built independently of the router: zero the consumer columns of the removed structures in a copy of the
    dense model (and, for OBS, put the stored updated weights in the kept columns)."""
    import copy

    store, model, stage, level = stores[method], ref.transformer, 2, 3
    zeroed = copy.deepcopy(model)
    for layer in prunable_layers(zeroed):
        removed = store.orders[(stage, layer.name)][: store.removed(layer.name, level)]
        cols = layer.columns(removed)
        with torch.no_grad():
            if method == "obs" and len(cols):
                kept = torch.ones(layer.consumer.in_features, dtype=torch.bool)
                kept[cols] = False
                layer.consumer.weight[:, kept] = store.weights[(stage, layer.name, len(removed))].float()
            layer.consumer.weight[:, cols] = 0.0
    router = WeightRouter(model, store)
    router.route(stage, level)
    try:
        kwargs = inputs(ref)
        assert torch.allclose(run(model, kwargs), run(zeroed, kwargs), atol=1e-5)
    finally:
        router.restore()


def test_a_failed_route_leaves_the_dense_model(ref, stores):
    model, kwargs = ref.transformer, inputs(ref)
    dense = run(model, kwargs)
    compact = PrunePlan(stores["obs"], [4, 0, 2]).compact_store()  # has only stage 0's level 4 weights
    router = WeightRouter(model, compact)
    with pytest.raises(ValueError, match="not in this store"):
        router.route(0, 3)  # the attention weights exist for it (same head count as level 4), the MLP's do not
    assert router.current == (0, 0) and torch.equal(run(model, kwargs), dense)
    router.route(0, 4)
    assert not torch.allclose(run(model, kwargs), dense)
    router.restore()


def test_pruning_is_one_removable_hook_and_a_second_apply_is_refused(ref, stores):
    model, store, kwargs = ref.transformer, stores["obs"], inputs(ref)
    dense, before = run(model, kwargs), set(model.__dict__)
    router = apply_pruning(model, store, [3, 2, 1])
    assert pruning_router(model) is router and model._diffusers_hook.get_hook("diffsparse_weight_routing")
    with pytest.raises(RuntimeError, match=r"already applied.*remove_pruning"):
        apply_pruning(model, store, [1, 1, 1])
    assert pruning_router(model) is router  # the first one is kept as it was
    pruned = run(model, kwargs)
    remove_pruning(model)
    assert set(model.__dict__) == before and not hasattr(model, "_diffusers_hook")
    assert torch.equal(run(model, kwargs), dense)
    with pytest.warns(UserWarning, match="No pruning is applied"):
        remove_pruning(model)
    # Next to the token cache, in the same HookRegistry: each comes off on its own.
    apply_token_cache(model, Schedule.uniform(model, num_steps=2, sparsity=0.0))
    apply_pruning(model, store, [3, 2, 1])
    assert torch.equal(run(model, kwargs), pruned)
    remove_token_cache(model)
    assert torch.equal(run(model, kwargs), pruned)
    remove_pruning(model)
    assert set(model.__dict__) == before and not any(hasattr(m, "_diffusers_hook") for m in model.modules())
    assert torch.equal(run(model, kwargs), dense)


def test_routing_switches_at_the_stage_boundaries_and_stitching_gives_the_same_samples(ref, stores):
    model, store = ref.transformer, stores["obs"]
    levels = [5, 1, 3]
    seen = []

    def record(module, args, kwargs, output):
        seen.append((int(kwargs["timestep"][0]), pruning_router(module).current))

    handle = model.register_forward_hook(record, with_kwargs=True)
    labels, noise = torch.tensor([3, 7]), initial_noise(2, ref.sample_shape, 0)
    apply_pruning(model, store, levels)
    try:
        with torch.no_grad():
            routed = sample(model, ref.scheduler(), labels, noise, 10, 1.25)
    finally:
        handle.remove()
        remove_pruning(model)
    for t, (stage, level) in seen:
        assert stage == stage_of_timestep(t, BOUNDARIES)[0] and level == levels[stage]
    assert {s for _, (s, _) in seen} == {0, 1, 2}
    stitched = StitchedModel(model, store, levels)
    with torch.no_grad():
        assert torch.equal(sample(stitched, ref.scheduler(), labels, noise, 10, 1.25), routed)
    assert parameter_bytes(stitched) > parameter_bytes(model) + PrunePlan(store, levels).compact_store().weight_bytes()


def test_store_round_trip_in_float16_and_compact_plans(ref, stores, tmp_path):
    store = stores["obs"]
    assert all(w.dtype == torch.float16 for w in store.weights.values())
    path = store.save(tmp_path / "store.safetensors")
    back = PruneStore.load(path)
    assert back.boundaries == BOUNDARIES and back.counts == store.counts and back.info == store.info
    assert all(torch.equal(back.orders[k], v) for k, v in store.orders.items())
    assert all(torch.equal(back.weights[k], v) for k, v in store.weights.items())
    plan = PrunePlan(store, [4, 0, 2], {"schedule": "test", "num_steps": 6})
    compact = plan.compact_store()
    assert 0 < compact.weight_bytes() < store.weight_bytes()
    assert {k[0] for k in compact.weights} == {0, 2}  # stage 1 is dense at level 0: nothing stored for it
    plan.save(tmp_path / "plan")
    loaded = PrunePlan.load(tmp_path / "plan")
    assert loaded.stage_levels == [4, 0, 2] and (tmp_path / "plan" / "plan.png").is_file()
    kwargs = inputs(ref, t=900)
    outs = []
    for p in (plan, loaded):
        apply_pruning(ref.transformer, p.store, p.stage_levels)
        outs.append(run(ref.transformer, kwargs))
        remove_pruning(ref.transformer)
    assert torch.equal(*outs)
    with pytest.raises(FileNotFoundError, match="prune_mosaic"):
        PrunePlan.load(tmp_path / "nothing")
    with pytest.raises(ValueError, match="levels"):
        PrunePlan(store, [7, 0, 0])  # above max_level


def test_presets_fit_the_budget_and_follow_their_pattern(ref, stores):
    store = stores["obs"]
    macs = level_macs(ref.transformer, store, ref.probe_inputs())
    assert macs[0] > macs[3] > macs[6]
    scheduler = ref.scheduler()
    scheduler.set_timesteps(50)
    t = scheduler.timesteps.tolist()
    one_stage = build_store(ref, "obs", [], samples=8, levels=8, max_level=6)
    (u,) = uniform_levels(one_stage, t, macs, 0.3)
    saved = [saved_fraction([v], [], t, macs) for v in range(7)]
    assert saved[0] == 0.0 and all(a < b for a, b in zip(saved, saved[1:], strict=False))  # more levels, more saved
    assert abs(saved[u] - 0.3) < 0.1
    mosaic_store = build_store(ref, "obs", list(MOSAICDIFF_BOUNDARIES), samples=8, levels=16, max_level=12)
    m_macs = level_macs(ref.transformer, mosaic_store, ref.probe_inputs())
    levels = mosaic_levels(mosaic_store, t, m_macs, 0.3)
    assert levels[0] > levels[2] > levels[1]  # high early, low in the middle, moderate late
    assert abs(saved_fraction(levels, list(MOSAICDIFF_BOUNDARIES), t, m_macs) - 0.3) < 0.05


def test_mosaicdiff_boundaries_make_its_table_average_to_its_sparsity():
    """The reading of MosaicDiff's "step 450 and 900" (sampling order): the stage pattern of its Table 2 row for
    0.30 averages to 0.30 over a DDIM trajectory; read as train timesteps (900, 450) it would average to 0.12."""
    from diffusers import DDIMScheduler

    s = DDIMScheduler(num_train_timesteps=1000)
    s.set_timesteps(50)
    stage = stage_of_timestep(s.timesteps.tolist(), MOSAICDIFF_BOUNDARIES)
    assert abs(np.asarray(MOSAICDIFF_PATTERN)[stage].mean() - 0.30) < 0.01
    other = stage_of_timestep(s.timesteps.tolist(), [900, 450])
    assert np.asarray(MOSAICDIFF_PATTERN)[other].mean() < 0.2


def test_step_boundaries_cut_where_the_stages_change():
    t = [900, 700, 500, 300, 100]
    assert step_boundaries(t, [0, 0, 1, 1, 2]) == [501, 101]
    assert stage_of_timestep(t, [501, 101]).tolist() == [0, 0, 1, 1, 2]
    space = StageSpace(("a", "b"), 5, 2, levels=8, max_level=6, first_step_full=False)
    assert space.upper().tolist() == [[6], [6]]


@pytest.mark.parametrize("method", ["obs", "wanda", "layerdrop"])
def test_pixart_cross_attention_heads_route_like_a_pruned_copy(method):
    """PixArt's units include cross-attention (`attn2`: queries from the image, keys and values from the text);
    its heads are routed like self-attention's. Calibrated here on random batches of its own inputs."""
    from diffsparse.backbones import build_transformer, example_inputs
    from diffsparse.prune.store import store_from_batches

    torch.manual_seed(0)
    model = build_transformer("pixart", "tiny").requires_grad_(False)
    assert [layer.name.rsplit(".", 1)[-1] for layer in prunable_layers(model)][:3] == ["attn1", "attn2", "ff"]
    batches = [[example_inputs(model, batch=4, seed=s)] for s in range(2)]
    store = store_from_batches(model, method, batches, [500], levels=4, max_level=2 if method == "layerdrop" else 3)
    kwargs = example_inputs(model, batch=2, seed=9)
    dense = run(model, kwargs)
    router = WeightRouter(model, store)
    for stage in (0, 1):
        router.route(stage, 2)
        try:
            routed = run(model, kwargs)
        finally:
            router.restore()
        assert torch.equal(routed, run(pruned_copy(model, store, stage, 2), kwargs))
        assert not torch.allclose(routed, dense)
    assert torch.equal(run(model, kwargs), dense)

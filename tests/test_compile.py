"""The cached forward under `torch.compile`: the hot path has no host-device synchronisation (a unit's partial
compute traces into one graph), `compile_units=True` gives the eager outputs and compiles per (unit kind, token
count), not per step, and a bf16 model keeps its dtype through the cache."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch._dynamo
from conftest import max_diff, run_loop
from diffusers import DDIMScheduler
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from diffsparse.backbones import (
    backbone_for,
    backbone_named,
    build_transformer,
    example_inputs,
    find_backbone,
    predict,
)
from diffsparse.cache import apply_token_cache, cacheable_units, remove_token_cache
from diffsparse.cache.hooks import UNIT_HOOK, token_cache_controller
from diffsparse.levels import ACTIONS, fresh_tokens
from diffsparse.model_hooks import find_hook
from diffsparse.models.sampling import sample
from diffsparse.schedule import Schedule

STEPS = [900, 800, 700, 600, 500, 400, 300, 200]


def random_actions(model, seed: int, forecast: bool = True) -> Schedule:
    """A schedule of random actions (all levels, copy and forecast), first step full."""
    units = cacheable_units(model)
    choices = len(ACTIONS) if forecast else 5
    actions = np.random.default_rng(seed).integers(0, choices, size=(len(STEPS), len(units)))
    actions[0] = 0
    return Schedule.from_actions(actions, units)


def unit_hooks(model):
    return [h for h in (find_hook(m, UNIT_HOOK) for m in model.modules()) if h is not None]


# Wan: its default selector only (toca needs attention maps, which its rotary self-attention does not give);
# key/value reuse: DiT and PixArt.
TRACED = [
    ("dit", "toca", False),
    ("dit", "norm", False),
    ("pixart", "toca", False),
    ("pixart", "norm", False),
    ("wan", "norm", False),
    ("dit", "toca", True),
    ("pixart", "norm", True),
]


@pytest.mark.parametrize("backbone, selector, reuse_kv", TRACED)
def test_partial_compute_traces_into_one_graph(backbone, selector, reuse_kv):
    """Each unit's partial step (choose the tokens, compute them, store them, copy or forecast the rest) compiles
    with `fullgraph=True`: a host-device synchronisation (`.item()`, `float(tensor)`, a data-dependent branch)
    would break the graph and fail here."""
    torch.manual_seed(0)
    model = build_transformer(backbone, "tiny").eval()
    inputs = example_inputs(model, batch=2)
    schedule = random_actions(model, seed=1)
    apply_token_cache(model, schedule, selector=selector, reuse_kv=reuse_kv)
    eager = run_loop(model, inputs, STEPS)
    remove_token_cache(model)

    apply_token_cache(model, schedule, selector=selector, reuse_kv=reuse_kv)
    hooks = unit_hooks(model)
    torch._dynamo.reset()
    counters.clear()
    for hook in hooks:
        hook._partial = torch.compile(hook._partial, fullgraph=True, backend="eager")  # shadows the method
    with torch._dynamo.config.patch(recompile_limit=1000, accumulated_recompile_limit=10000):
        compiled = run_loop(model, inputs, STEPS)
    assert counters["stats"]["unique_graphs"] > 0  # the partial steps did run compiled
    assert max_diff(eager, compiled) == 0.0
    remove_token_cache(model)


def distinct_computations(model, schedule: Schedule, tokens: int) -> int:
    """The (unit kind, fresh-token count) pairs a trajectory of `schedule` computes (full computes included)."""
    controller = token_cache_controller(model)
    pairs = set()
    for row in schedule.grid:
        for u in controller.units:
            if row[u.index] < 1.0:
                pairs.add((u.kind, fresh_tokens(float(row[u.index]), tokens)))
    return len(pairs)


@pytest.mark.parametrize("backbone", ["dit", "pixart"])
def test_compiled_units_give_the_eager_outputs_and_compile_per_kind_and_token_count(backbone):
    torch.manual_seed(0)
    model = build_transformer(backbone, "tiny").eval()
    inputs = example_inputs(model, batch=2)
    schedule = random_actions(model, seed=2)
    apply_token_cache(model, schedule, selector="norm")
    eager = run_loop(model, inputs, STEPS)
    remove_token_cache(model)

    torch._dynamo.reset()
    counters.clear()
    apply_token_cache(model, schedule, selector="norm", compile_units={"backend": "eager"})
    assert all(h.compute is not None for h in unit_hooks(model))
    first = run_loop(model, inputs, STEPS)
    graphs = counters["stats"]["unique_graphs"]
    second = run_loop(model, inputs, STEPS)  # a second trajectory compiles nothing more
    tokens = inputs["hidden_states"].shape[-1] * inputs["hidden_states"].shape[-2] // 4
    bound = distinct_computations(model, schedule, tokens)
    assert max_diff(eager, first) == 0.0 and max_diff(eager, second) == 0.0
    assert 0 < graphs <= bound, (graphs, bound)
    assert counters["stats"]["unique_graphs"] == graphs
    remove_token_cache(model)
    assert all(find_hook(m, UNIT_HOOK) is None for m in model.modules())  # compiled or not, it comes off


def test_compiled_units_at_sparsity_zero_match_the_compiled_dense_model():
    """With inductor (this CPU's C++ compiler): sparsity 0 with the units compiled equals the whole model compiled
    to 1e-5 (the two compile different graphs, so float rounding may differ), and a cached schedule equals its eager
    run to 1e-5."""
    torch.manual_seed(0)
    model = build_transformer("dit", "tiny").eval()
    inputs = example_inputs(model, batch=2)
    torch._dynamo.reset()
    dense = run_loop(torch.compile(copy.deepcopy(model)), inputs, STEPS)
    apply_token_cache(model, Schedule.uniform(model, len(STEPS), 0.0), selector="norm", compile_units=True)
    assert max_diff(dense, run_loop(model, inputs, STEPS)) <= 1e-5
    remove_token_cache(model)

    schedule = random_actions(model, seed=3)
    apply_token_cache(model, schedule, selector="norm")
    eager = run_loop(model, inputs, STEPS)
    remove_token_cache(model)
    apply_token_cache(model, schedule, selector="norm", compile_units=True)
    assert max_diff(eager, run_loop(model, inputs, STEPS)) <= 1e-5
    remove_token_cache(model)


def to_bf16(value):
    """Floating tensors (in nested dicts too) in bf16; everything else as it is."""
    if isinstance(value, dict):
        return {k: to_bf16(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(torch.bfloat16)
    return value


def cache_dtypes(controller, seen: dict):
    """A forward hook that records the dtypes and devices of what the cache holds."""

    def keep(module, args, output):
        state = controller.current
        seen["cache"] = {t.dtype for t in state.cache.values()}
        seen["factors"] = {f.dtype for fs in state.factors.values() for f in fs}
        seen["devices"] = {t.device.type for t in [*state.cache.values(), *state.last_fresh.values()]}

    return keep


@pytest.mark.parametrize("backbone", ["dit", "pixart"])
def test_a_bf16_model_keeps_its_dtype_and_sparsity_zero_equals_bf16_dense(backbone):
    torch.manual_seed(0)
    model = build_transformer(backbone, "tiny").eval().to(torch.bfloat16)
    inputs = to_bf16(example_inputs(model, batch=2))
    dense = run_loop(model, inputs, STEPS)
    apply_token_cache(model, Schedule.uniform(model, len(STEPS), 0.0))
    assert max_diff(dense, run_loop(model, inputs, STEPS)) == 0.0
    remove_token_cache(model)

    for factors, expected in (("float32", torch.float32), ("model", torch.bfloat16)):
        controller = apply_token_cache(model, random_actions(model, seed=4), selector="norm", forecast_dtype=factors)
        seen = {}
        handle = model.transformer_blocks[-1].register_forward_hook(cache_dtypes(controller, seen))
        outs = run_loop(model, inputs, STEPS)
        handle.remove()
        assert {o.dtype for o in outs} == {torch.bfloat16} and all(torch.isfinite(o).all() for o in outs)
        assert seen["cache"] == {torch.bfloat16} and seen["factors"] == {expected} and seen["devices"] == {"cpu"}
        remove_token_cache(model)


def test_a_timestep_on_an_accelerator_is_never_read_and_the_steps_are_counted():
    """Reading a device tensor's value waits for the device: a loop whose timesteps live there (a stock pipeline on
    a GPU) is followed by counting calls; a meta tensor stands for it here (reading one raises)."""
    model = build_transformer("dit", "tiny", sample_size=16, in_channels=1, num_classes=10)
    apply_token_cache(model, random_actions(model, seed=1).resample(4))
    controller = token_cache_controller(model)
    inputs = {"hidden_states": torch.randn(2, 1, 16, 16)}
    timestep = torch.tensor([900.0], device="meta")
    with pytest.raises(RuntimeError):
        float(timestep)
    seen = []
    for _ in range(6):  # 4 steps, then the next trajectory (the schedule's last step ended the first)
        controller.begin_forward(model, inputs, timestep, None)
        seen.append(controller.current.step)
        controller.end_forward()
    assert seen == [0, 1, 2, 3, 0, 1]
    controller.reset()  # a stock pipeline's reset at the end of its call: the next call starts again
    controller.begin_forward(model, inputs, timestep, None)
    assert controller.current.step == 0


@pytest.mark.parametrize("backbone", ["dit", "pixart", "flux", "wan"])
def test_a_compiled_model_is_called_as_the_model_it_wraps(backbone):
    """The sampling loop finds a `torch.compile`d model's backbone through the module it wraps: FLUX's latents are
    packed and Wan's frames kept as for the eager model (looked up by the wrapper's class, they were passed as a
    DiT's, and the compiled FLUX failed at its first layer)."""
    torch.manual_seed(0)
    spec = backbone_named(backbone)
    model, latents, conditions = spec.bench_case("tiny", 4, 2, 2)
    latents = torch.cat([latents, latents]) if spec.guided else latents  # the conditions of guided ones are CFG pairs
    compiled = torch.compile(model, backend="eager")
    assert find_backbone(compiled) is backbone_for(model)
    t = torch.tensor(500)
    with torch.inference_mode():
        assert torch.equal(predict(compiled, latents, t, conditions), predict(model, latents, t, conditions))


NOT_WORK = {  # views, and reading a host number
    *("view", "_unsafe_view", "expand", "t", "transpose", "unsqueeze", "squeeze", "slice", "select", "as_strided"),
    *("permute", "alias", "split", "chunk", "unbind", "detach", "_reshape_alias", "reshape", "flatten", "unflatten"),
    "item",
}


class _Operators(TorchDispatchMode):
    """Counts the operators that do work (about one kernel launch each on a GPU); views are free."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ not in NOT_WORK
        return func(*args, **(kwargs or {}))


def test_a_partial_unit_costs_at_most_seventeen_operators_beyond_its_compute():
    """On a GPU the cached path runs at the host's pace (docs/results/speed.md#gpu): every operator a partial unit
    adds (choosing tokens with the toca selector and CFG pairs, gathering them, writing them back, stamping their
    step) is a launch. 17 today; this keeps the count from creeping back up."""
    model = build_transformer("dit", "tiny")
    inputs = example_inputs(model, batch=2)
    inputs["timestep"] = torch.full((2,), 500)
    earlier = {**inputs, "timestep": torch.full((2,), 600)}
    units = cacheable_units(model)
    with torch.inference_mode():
        with _Operators() as dense:
            model(**inputs)
        apply_token_cache(model, Schedule.uniform(units, 2, 0.5), selector="toca", cfg=True)
        model(**earlier)  # the full step
        with _Operators() as partial:
            model(**inputs)
        remove_token_cache(model)
    extra = (partial.count - dense.count) / len(units)
    assert extra <= 17, extra


class _HostCopies(TorchDispatchMode):
    """Records the copies of host tensors onto another device (what a CUDA graph cannot capture)."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        moved = func.overloadpacket.__name__ in ("to", "_to_copy", "copy_", "lift_fresh_copy")
        if moved and source is not None and source.device.type == "cpu" and out.device.type != "cpu":
            self.copies.append((func.overloadpacket.__name__, tuple(source.shape)))
        return out


def test_a_cached_trajectory_copies_nothing_from_the_host_to_the_device():
    """The sampling loop with the token cache, on a device that is not the host (meta: shapes only), copies no host
    tensor onto it: the timestep is filled in on the device, not copied at every step (a copy a CUDA graph cannot
    capture; `bench/gpu/graphs.py` captures `sample` whole). The schedulers' host numbers enter as scalars."""
    model = build_transformer("dit", "tiny").to("meta")
    apply_token_cache(model, Schedule.uniform(cacheable_units(model), 4, 0.5), selector="toca", cfg=True)
    noise = torch.randn(1, model.config.in_channels, 8, 8, device="meta")
    with torch.inference_mode(), _HostCopies() as seen:
        out = sample(model, DDIMScheduler(), torch.tensor([1], device="meta"), noise, 4, guidance_scale=1.5)
    assert out.shape == noise.shape
    assert seen.copies == []

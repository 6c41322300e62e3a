"""Forecast actions: diffusers' TaylorSeer reproduced, the Taylor step per token, training mode, the file format."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import TaylorSeerCacheConfig
from diffusers.hooks import apply_taylorseer_cache

from diffsparse import Schedule, apply_token_cache, cacheable_units, remove_token_cache
from diffsparse.allocate.baselines import forecast_fora, forecast_warmup, toca
from diffsparse.backbones import build_transformer
from diffsparse.cache.control import set_soft_choice
from diffsparse.cache.forecast import forecast, update_history
from diffsparse.cache.state import TrajectoryState
from diffsparse.cache.summary import token_cache_summary
from diffsparse.evaluate.methods import unit_patterns
from diffsparse.levels import ACTIONS
from diffsparse.models.sampling import initial_noise, make_scheduler, sample
from diffsparse.reference.model import NOISE_SCHEDULE


@pytest.fixture(scope="module")
def tiny():
    return build_transformer("dit", "tiny", sample_size=16, in_channels=1, num_classes=10).requires_grad_(False)


def _rollout(model, steps, grad=False):
    noise = initial_noise(3, (1, 16, 16), seed=4)
    with torch.set_grad_enabled(grad):
        return sample(model, make_scheduler("ddim", NOISE_SCHEDULE), torch.tensor([2, 6, 9]), noise, steps, 2.0)


def _taylorseer_steps(num_steps: int, interval: int, before: int) -> list[int]:
    """The steps diffusers' TaylorSeer computes (its `_measure_should_compute`, read to match the semantics)."""
    return [s for s in range(num_steps) if s < before or (s - before - 1) % interval == 0]


@pytest.mark.parametrize(("interval", "before"), [(2, 3), (3, 1), (4, 2)])
def test_forecast_schedule_reproduces_diffusers_taylorseer(tiny, interval, before):
    steps = 14
    full = _taylorseer_steps(steps, interval, before)
    grid = np.ones((steps, len(cacheable_units(tiny))))
    grid[full] = 0.0
    sched = forecast_warmup(cacheable_units(tiny), steps, interval, warmup=before)  # TaylorSeer's shape, by name
    assert sched == Schedule(grid, cacheable_units(tiny), forecast=np.ones_like(grid, dtype=bool))
    apply_token_cache(tiny, sched, forecast_order=1, forecast_dtype="float32")
    try:
        ours = _rollout(tiny, steps)
    finally:
        remove_token_cache(tiny)
    config = TaylorSeerCacheConfig(
        cache_interval=interval,
        disable_cache_before_step=before,
        max_order=1,
        taylor_factors_dtype=torch.float32,
        cache_identifiers=[unit_patterns(tiny)[0]],
    )
    theirs_model = copy.deepcopy(tiny)
    apply_taylorseer_cache(theirs_model, config)
    theirs = _rollout(theirs_model, steps)
    dense = _rollout(tiny, steps)
    assert (ours - theirs).abs().max() <= 1e-5, (ours - theirs).abs().max()
    assert (ours - dense).abs().max() > 1e-3  # the forecast really ran: it is not the dense model


def test_taylor_step_per_token_is_exact_on_polynomials():
    """f(t) = a + b t + c t^2 per token, tokens computed at different steps: order 2 forecasts it exactly, order 1
    extrapolates the line through each token's last two computations."""
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(1, 4, 3, generator=g, dtype=torch.float64) for _ in range(3))

    def f(t):
        return a + b * t + c * t * t

    for order in (1, 2):
        state = TrajectoryState()
        state.step = 0
        state.store_full(0, f(0.0), f(0.0), keep_inputs=False)
        computed = {i: [0] for i in range(4)}
        for step, tokens in [(2, [0, 1, 2, 3]), (3, [0, 2]), (5, [0, 1, 3])]:
            state.step = step
            idx = torch.tensor([tokens])
            fresh = f(float(step))[:, tokens]
            rows = idx.flatten()
            update_history(state, 0, fresh, rows, idx, order, torch.float64)
            cache = state.cache[0].clone().view(-1, 3).index_copy(0, rows, fresh.reshape(-1, 3)).view(1, 4, 3)
            state.store_partial(0, cache, idx, rows, None, keep_inputs=False)
            for i in tokens:
                computed[i].append(step)
        target = 7
        got = forecast(state, 0, target, order)
        for i, seen in computed.items():
            t0, t1 = seen[-1], seen[-2]
            if order == 2:
                want = f(float(target))[:, i]
            else:
                want = f(float(t0))[:, i] + (f(float(t0)) - f(float(t1)))[:, i] / (t0 - t1) * (target - t0)
            assert torch.allclose(got[:, i], want, atol=1e-9), (order, i)


def test_training_mode_with_forecast_actions_equals_inference(tiny):
    units = cacheable_units(tiny)
    steps = 8
    sched = toca(units, steps, fresh_ratio=0.3, interval=3)
    modes = np.zeros(sched.grid.shape, dtype=bool)
    modes[:, ::2] = True  # every other unit forecasts, the rest copy
    sched = sched.with_forecast(modes)
    assert sched.forecast.any() and (~sched.forecast[sched.grid > 0]).any()
    h = torch.nn.functional.one_hot(torch.as_tensor(sched.action_indices()), len(ACTIONS)).double()
    h.requires_grad_(True)
    apply_token_cache(tiny, sched)
    try:
        fast = _rollout(tiny, steps)
        set_soft_choice(tiny, sched, h.float())
        blended = _rollout(tiny, steps)
        hard = h.float().detach().requires_grad_(True)
        set_soft_choice(tiny, sched, hard)
        loss = _rollout(tiny, steps, grad=True).pow(2).mean()
        loss.backward()
        set_soft_choice(tiny, sched, None)
        again = _rollout(tiny, steps)
        copy_only = sched.with_forecast(False)
        set_soft_choice(tiny, copy_only, None)
        copied = _rollout(tiny, steps)
    finally:
        remove_token_cache(tiny)
    assert torch.allclose(blended, fast, atol=1e-4), (blended - fast).abs().max()
    assert torch.equal(again, fast)
    assert (copied - fast).abs().max() > 1e-4  # forecasting changes the result
    forecast_actions = [a for a, (_, mode) in enumerate(ACTIONS) if mode == "forecast"]
    assert hard.grad[1:, :, forecast_actions].abs().sum() > 0  # the loss reaches the forecast actions


def test_forecast_memory_is_reported_per_unit(tiny):
    units = cacheable_units(tiny)
    modes = np.zeros((6, len(units)), dtype=bool)
    modes[:, 0] = True
    sched = Schedule.uniform(units, 6, 0.5).with_forecast(modes)
    apply_token_cache(tiny, sched)
    try:
        _rollout(tiny, 6)
        summary = token_cache_summary(tiny)
    finally:
        remove_token_cache(tiny)
    assert set(summary.forecast_bytes) == {units[0]}
    assert summary.forecast_bytes[units[0]] > 0


def test_schedule_file_keeps_the_modes_and_old_files_mean_copy(tmp_path):
    units = ["a", "b"]
    sched = forecast_fora(units, 6, interval=3)
    assert sched.forecast[1:3].all() and not sched.forecast[0].any() and not sched.forecast[3].any()
    path = sched.save(tmp_path / "s.json")
    assert Schedule.load(path) == sched
    old = json.loads(path.read_text())
    old["version"] = 1
    del old["forecast"]
    (tmp_path / "v1.json").write_text(json.dumps(old))
    loaded = Schedule.load(tmp_path / "v1.json")
    assert np.array_equal(loaded.grid, sched.grid) and not loaded.forecast.any()
    assert Schedule.from_actions(sched.action_indices(), units) == sched
    with pytest.raises(ValueError, match="forecast_order"):
        apply_token_cache(torch.nn.Linear(1, 1), sched, forecast_order=3)


def test_copy_only_schedules_give_the_samples_they_gave_before_forecasting_existed():
    """The shipped (copy-only) schedule's samples, stored from the code before forecast actions (commit fc184c6):
    bit-equal there on this machine; 1e-5 here, as other machines' BLAS may differ in the last bits."""
    from diffsparse.models.loading import load_model
    from diffsparse.reference.model import DEFAULT_GUIDANCE, SHIPPED_SCHEDULE

    ref = load_model("reference")
    sched = Schedule.load(SHIPPED_SCHEDULE)
    assert not sched.forecast.any()
    apply_token_cache(ref.transformer, sched)
    try:
        noise = initial_noise(4, ref.sample_shape, 7)
        with torch.no_grad():
            x = sample(ref.transformer, ref.scheduler("ddim"), torch.tensor([0, 3, 7, 9]), noise, 50,
                       DEFAULT_GUIDANCE, null_class=ref.num_classes)  # fmt: skip
    finally:
        remove_token_cache(ref.transformer)
    before = torch.load(Path(__file__).parent / "data" / "shipped_schedule_samples.pt")
    assert (x - before).abs().max() <= 1e-5

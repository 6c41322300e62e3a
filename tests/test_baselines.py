"""Hand-made schedules: their shapes, and fitting each family to a MAC budget."""

import numpy as np
import pytest

from diffsparse.accounting.macs import mac_table
from diffsparse.allocate import baselines
from diffsparse.cache import cacheable_units
from diffsparse.levels import SPARSITY_LEVELS

UNITS = [f"transformer_blocks.{i}.{leaf}" for i in range(2) for leaf in ("attn1", "ff")]


@pytest.fixture(scope="module")
def table():
    from diffsparse.backbones import build_transformer, example_inputs

    model = build_transformer("dit", "tiny", sample_size=16)
    return mac_table(model, **example_inputs(model, batch=2))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.6, 0.9, 1.0])
def test_uniform_between_levels_alternates_two_levels_with_the_right_mean(sparsity):
    grid = baselines.uniform(UNITS, 41, sparsity).grid
    assert (grid[0] == 0).all()
    assert set(np.unique(grid[1:])) <= set(SPARSITY_LEVELS)
    assert len(np.unique(grid[1:])) <= 2
    assert grid[1:].mean() == pytest.approx(sparsity, abs=0.25 / 40 + 1e-9)
    assert (grid == grid[:, :1]).all()  # the same in every unit


def test_fora_reuses_everything_between_full_steps():
    grid = baselines.fora(UNITS, 7, interval=3).grid
    assert baselines.fora(UNITS, 7, interval=3).full_steps == [0, 3, 6]
    assert (grid[[1, 2, 4, 5]] == 1).all()


def test_toca_full_steps_module_weights_and_ramp():
    sched = baselines.toca(UNITS, 12, fresh_ratio=0.2, interval=3, ramp=0.5)
    grid = sched.grid
    assert sched.full_steps == [0, 3, 6, 9]
    attn, ff = grid[:, 0], grid[:, 1]
    partial = [t for t in range(12) if t % 3]
    assert (attn[partial] <= ff[partial]).all() and (attn[partial] < ff[partial]).any()  # attention keeps more
    assert ff[partial[0]] <= ff[partial[-1]]  # fewer fresh tokens late in the trajectory
    flat = baselines.toca(UNITS, 12, fresh_ratio=0.25, interval=3, ramp=0.0).grid
    assert set(flat[1, [0, 2]]) == {0.5} and set(flat[1, [1, 3]]) == {0.75}


def test_duca_alternates_toca_steps_and_reuse_all_steps():
    grid = baselines.duca(UNITS, 9, fresh_ratio=0.25, interval=4, ramp=0.0).grid
    assert (grid[[0, 4, 8]] == 0).all()
    assert (grid[[2, 6]] == 1).all()
    assert (grid[[1, 3, 5, 7]] < 1).all() and (grid[[1, 3, 5, 7]] > 0).all()


def test_snr_stages_follow_the_timesteps():
    timesteps = [980, 920, 860, 700, 500, 440, 200, 20]
    grid = baselines.snr_stages(UNITS, timesteps, (0.75, 0.25, 0.5), (900, 450)).grid
    assert grid[:, 0].tolist() == [0.0, 0.75, 0.25, 0.25, 0.25, 0.5, 0.5, 0.5]


def test_snr_stage_boundaries_put_the_fast_stage_in_the_middle():
    betas = np.linspace(1e-4, 0.02, 1000)
    upper, lower = baselines.snr_stage_boundaries(np.cumprod(1 - betas), threshold=0.55)
    assert 0 < lower < upper < 1000
    wider = baselines.snr_stage_boundaries(np.cumprod(1 - betas), threshold=0.3)
    assert wider[0] >= upper and wider[1] <= lower


def test_fewer_steps():
    assert baselines.fewer_steps(50, 0.5) == 25
    assert baselines.fewer_steps(50, 0.0) == 50
    with pytest.raises(ValueError):
        baselines.fewer_steps(50, 1.0)


@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_every_family_lands_near_the_budget(table, budget):
    scheduler_steps = list(range(999, 0, -20))  # 50 steps
    fitted = baselines.budget_schedules(table, scheduler_steps, budget)
    assert set(fitted) == {"uniform", "fora", "forecast_fora", "forecast_warmup", "toca", "duca", "snr_stages"}
    for name, sched in fitted.items():
        assert sched.num_steps == 50 and sched.full_steps[0] == 0
        if name in ("uniform", "toca", "duca"):  # fine knobs: close to the budget
            assert abs(table.saved_fraction(sched) - budget) < 0.03, name
    # FORA's knob is an integer interval: the chosen one is the closest of its neighbours
    gap = {n: abs(table.saved_fraction(baselines.fora(table.units, 50, n)) - budget) for n in range(1, 6)}
    assert gap[fitted["fora"].meta["interval"]] == min(gap.values())


def test_saved_fraction_matches_schedule_macs(table):
    from diffsparse.backbones import build_transformer, example_inputs

    model = build_transformer("dit", "tiny", sample_size=16)
    sched = baselines.toca(cacheable_units(model), 10, fresh_ratio=0.3)
    macs = sched.macs(model, **example_inputs(model, batch=2))
    assert table.saved_fraction(sched) == pytest.approx(1 - macs["cached"] / macs["dense"], rel=1e-12)


@pytest.mark.parametrize("steps", [0, 1])
def test_fewer_than_two_steps_are_refused_with_what_to_choose(table, steps):
    with pytest.raises(ValueError, match=rf"steps={steps}: .*at least 2 steps.*choose steps >= 2"):
        baselines.budget_schedules(table, list(range(999, 0, -1000 // max(steps, 1)))[:steps], 0.5)


def test_an_unreachable_budget_is_refused_in_fractions_of_the_macs(table):
    from diffsparse.allocate.solver import max_saving

    timesteps = list(range(999, 0, -125))  # 8 steps
    most = max_saving(8, table)
    with pytest.raises(ValueError, match=r"budget=0.95 cannot be met: with 8 steps .* at most 0\.\d\d of the MACs"):
        baselines.budget_schedules(table, timesteps, 0.95)
    fitted = baselines.budget_schedules(table, timesteps, most)  # the largest one is still fitted
    assert table.saved_fraction(fitted["uniform"]) >= most

"""A time budget: per-action step times measured on this device (`TimeTable`), the DP and the hand-made fitting
counted in them, and the recipe learning under one (`learn.budget_unit=time`)."""

import dataclasses
import json

import numpy as np
import pytest
from test_learn import train

from diffsparse import Schedule, cacheable_units
from diffsparse.accounting.times import TimeTable
from diffsparse.allocate import baselines
from diffsparse.allocate.solver import InfeasibleBudget, check_budget, solve_schedule
from diffsparse.cache import costs
from diffsparse.cache.costs import COPY_ALL, roles
from diffsparse.levels import ACTIONS, SPARSITY_LEVELS
from diffsparse.models.loading import load_model


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def _fake_step_times(model, kwargs, schedule, selector, device, every=1):
    """Deterministic 'timings': 1 s of work outside the units, 10 s per unit computing all its tokens (its share
    of fresh tokens at a partial level, plus 1 s of overhead), 0.5 s per forecast, 2 s per block in which any
    unit computes (its norms: what makes the real model non-additive), and 3 s more for a step timed after one
    that reused (every other step: memory no longer warm)."""
    actions = schedule.action_indices()[costs.LEAD]  # the measured action of the trajectory
    cost = 1.0
    for a in actions:
        level, mode = ACTIONS[a]
        cost += 10.0 * (1 - level) + (1.0 if 0 < level < 1 else 0.0) + (0.5 if mode == "forecast" else 0.0)
    blocks = {unit // 2 for unit, a in enumerate(actions) if ACTIONS[a][0] < 1.0}
    return [cost + 2.0 * len(blocks) + (3.0 if every == 2 else 0.0)] * 4


@pytest.fixture(scope="module")
def table(tiny):
    """A table measured for real (its numbers are noise on a model this small; only its form is checked)."""
    return tiny.time_table(pairs=2, selector="toca")


@pytest.fixture
def fake_table(tiny, monkeypatch):
    monkeypatch.setattr(costs, "_step_times", _fake_step_times)
    return costs.measure_time_table(tiny.transformer, tiny.probe_inputs(), progress=False)


def test_units_of_one_role_share_a_row():
    names = ["blocks.0.attn1", "blocks.0.ff", "blocks.1.attn1", "blocks.1.ff", "single.0", "single.1"]
    assert roles(names) == {"blocks.*.attn1": [0, 2], "blocks.*.ff": [1, 3], "single.*": [4, 5]}


def test_a_measured_table_has_its_form(tiny, table):
    assert table.units == tuple(cacheable_units(tiny.transformer))
    assert table.meta["batch"] == 4 and table.meta["device"] == "cpu" and table.meta["dtype"] == "float32"
    seconds = table.action_seconds
    assert seconds.shape == (4, len(ACTIONS)) and (seconds >= 0).all() and (seconds[:, COPY_ALL] == 0).all()
    assert table.other == table.meta["copy_step_measured"] > 0


def test_the_table_is_exact_at_both_ends_and_scales_what_computes(fake_table):
    # dense: 1 + 4 units x 10 + 2 blocks x 2 = 45; inside a cached trajectory 48; every unit copying: 1
    assert fake_table.other == 1.0 and fake_table.dense_step == pytest.approx(45.0)
    assert fake_table.full_step == pytest.approx(48.0) and fake_table.meta["full_step_measured"] == 48.0
    # each role alone computing costs 2 x 10 + 2 x 2 (its blocks' norms) = 24 above the copy step: 12 per unit,
    # counted twice over the two roles (48 against the 47 measured), so the computing actions are scaled by 47/48
    scale = 47.0 / 48.0
    assert fake_table.meta["compute_scale"] == pytest.approx(scale)
    assert fake_table.action_seconds[:, 0] == pytest.approx([12.0 * scale] * 4)
    half = list(ACTIONS).index((0.5, "copy"))
    assert fake_table.action_seconds[:, half] == pytest.approx([(5.0 + 1.0 + 2.0) * scale] * 4)
    forecast_all = list(ACTIONS).index((1.0, "forecast"))
    assert fake_table.action_seconds[:, forecast_all] == pytest.approx([0.5] * 4)  # computes nothing: not scaled
    units, steps = len(fake_table.units), 6
    # computing everything through the cache is predicted slower than the dense model
    dense = Schedule(np.zeros((steps, units)), fake_table.units, {})
    assert fake_table.saved_fraction(dense) == pytest.approx(1 - 48.0 / 45.0)
    copy = np.ones((steps, units))
    copy[0] = 0.0
    predicted = fake_table.predicted_speedup(Schedule(copy, fake_table.units, {}))
    assert predicted == pytest.approx(steps * 45.0 / (48.0 + (steps - 1) * 1.0))


def test_a_table_saves_and_loads(table, tmp_path):
    table.save(tmp_path / "t.json")
    again = TimeTable.load(tmp_path / "t.json")
    assert again.units == table.units and np.array_equal(again.action_seconds, table.action_seconds)
    assert again.other == table.other and again.meta == json.loads(json.dumps(table.meta))
    with pytest.raises(FileNotFoundError, match="No time table"):
        TimeTable.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a time table"):
        TimeTable.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="units x actions"):
        TimeTable(("a",), np.zeros((1, 3)), 0.0)


def _made_up_table() -> TimeTable:
    """Two units; a partial step costs more than computing everything, forecasting more than copying."""
    seconds = np.zeros((2, len(ACTIONS)))
    seconds[:, : len(SPARSITY_LEVELS)] = [[10.0, 11.0, 9.0, 8.0, 0.0], [10.0, 12.0, 10.5, 9.0, 0.0]]
    seconds[:, len(SPARSITY_LEVELS) :] = [[11.5, 9.5, 8.5, 1.0], [12.5, 11.0, 9.5, 1.0]]
    return TimeTable(("u0", "u1"), seconds, 2.0)


@pytest.mark.parametrize("budget", [0.2, 0.5, 0.8])
def test_the_dp_meets_a_time_budget_with_what_saves_time(budget):
    table = _made_up_table()
    rng = np.random.default_rng(0)
    costs = rng.random((10, 2, len(ACTIONS)))
    actions = solve_schedule(costs, budget, table)
    schedule = Schedule.from_actions(actions, table.units, {})
    assert table.saved_fraction(schedule) >= budget - 1e-9
    assert (actions[0] == 0).all()
    # an action slower than computing everything is never chosen, however cheap its learned cost
    slower = table.action_costs > table.action_costs[:, :1]
    assert slower.sum() == 6 and not slower[np.arange(2), actions].any()
    costs[:, slower] = -5.0
    assert not slower[np.arange(2), solve_schedule(costs, budget, table)].any()


def test_the_dp_counts_the_dearer_full_steps_of_a_cached_trajectory():
    cheaper_dense = dataclasses.replace(_made_up_table(), dense_seconds=18.0)  # full step: 22
    costs = np.random.default_rng(1).random((10, 2, len(ACTIONS)))
    for budget in (0.3, 0.6):
        schedule = Schedule.from_actions(solve_schedule(costs, budget, cheaper_dense), cheaper_dense.units, {})
        assert cheaper_dense.saved_fraction(schedule) >= budget - 1e-9
    with pytest.raises(InfeasibleBudget, match="at most 0.77 of the time"):  # 1 - (22 + 9 x 2) / (10 x 18)
        check_budget(0.9, 10, cheaper_dense)


def test_time_budgets_beyond_reach_say_so_in_time():
    with pytest.raises(InfeasibleBudget, match="of the time can be saved"):
        check_budget(0.95, 10, _made_up_table())


def test_hand_made_schedules_fit_a_time_budget(tiny, fake_table):
    scheduler = tiny.scheduler("ddim")
    scheduler.set_timesteps(10)
    fitted = baselines.budget_schedules(fake_table, scheduler.timesteps.tolist(), 0.4)
    assert {"fora", "forecast_fora", "toca", "uniform"} <= set(fitted)
    assert abs(fake_table.saved_fraction(fitted["uniform"]) - 0.4) < 0.1


def test_the_recipe_learns_under_a_time_budget(tmp_path, fake_table):
    # a given table (timings of a model this small are noise; `test_a_measured_table_has_its_form` measures one)
    fake_table.save(tmp_path / "given.json")
    common = ["experiment=learn", "model=tiny", "learn.num_steps=8", "data.train_size=8", "data.val_size=4",
              "data.batch_size=4", "trainer.max_epochs=1", "learn.refine_passes=0", "learn.budget=0.3",
              "learn.budget_unit=time"]  # fmt: skip
    out = train(tmp_path / "time", *common, f"learn.time_table={tmp_path / 'given.json'}")
    assert TimeTable.load(out / "time_table.json").action_seconds.tolist() == fake_table.action_seconds.tolist()
    table = TimeTable.load(out / "time_table.json")
    sched = Schedule.load(out / "schedule.json")
    assert sched.meta["saved_time_predicted"] == pytest.approx(table.saved_fraction(sched))
    assert sched.meta["saved_time_predicted"] >= 0.3 - 1e-9
    assert sched.meta["time_table"] == table.meta
    # the table is reused as it is: the same schedule from the same costs
    again = train(tmp_path / "again", *common, f"learn.time_table={out / 'time_table.json'}")
    assert Schedule.load(again / "schedule.json") == sched


def test_bad_budget_units_are_refused(tmp_path):
    from diffsparse.learn.module import ScheduleLearner

    with pytest.raises(ValueError, match="budget_unit='seconds'"):
        ScheduleLearner(model="tiny", num_steps=8, budget_unit="seconds")
    with pytest.raises(FileNotFoundError, match="No time table"):
        ScheduleLearner(model="tiny", num_steps=8, budget_unit="time", time_table=str(tmp_path / "none.json"))

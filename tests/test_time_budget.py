"""A time budget: per-action step times measured on this device (`TimeTable`), the DP and the hand-made fitting
counted in them, and the recipe learning under one (`learn.budget_unit=time`)."""

import json

import numpy as np
import pytest
from test_learn import train

from diffsparse import Schedule, cacheable_units
from diffsparse.accounting.times import TimeTable
from diffsparse.allocate import baselines
from diffsparse.allocate.solver import InfeasibleBudget, check_budget, solve_schedule
from diffsparse.cache.costs import COPY_ALL, roles
from diffsparse.levels import ACTIONS, SPARSITY_LEVELS
from diffsparse.models.loading import load_model


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def table(tiny):
    return tiny.time_table(pairs=2, selector="toca")


def test_units_of_one_role_share_a_row():
    names = ["blocks.0.attn1", "blocks.0.ff", "blocks.1.attn1", "blocks.1.ff", "single.0", "single.1"]
    assert roles(names) == {"blocks.*.attn1": [0, 2], "blocks.*.ff": [1, 3], "single.*": [4, 5]}


def test_a_measured_table_is_exact_at_both_ends(tiny, table):
    assert table.units == tuple(cacheable_units(tiny.transformer))
    assert table.meta["batch"] == 4 and table.meta["device"] == "cpu" and table.meta["dtype"] == "float32"
    seconds = table.action_seconds
    assert (seconds >= 0).all() and (seconds[:, COPY_ALL] == 0).all()
    assert (seconds[:, 0] > 0).all()  # computing every token costs time
    # the all-copy step is `other`, the dense step what it measured
    assert table.dense_step == pytest.approx(table.meta["dense_step_measured"])
    assert table.other == table.meta["copy_step_measured"] < table.dense_step
    units, steps = len(table.units), 6
    dense = Schedule(np.zeros((steps, units)), table.units, {})
    assert table.saved_fraction(dense) == pytest.approx(0.0)
    copy = np.ones((steps, units))
    copy[0] = 0.0
    predicted = table.predicted_speedup(Schedule(copy, table.units, {}))
    assert predicted == pytest.approx(steps / (1 + (steps - 1) * table.other / table.dense_step))


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


def test_time_budgets_beyond_reach_say_so_in_time():
    with pytest.raises(InfeasibleBudget, match="of the time can be saved"):
        check_budget(0.95, 10, _made_up_table())


def test_hand_made_schedules_fit_a_time_budget(tiny, table):
    scheduler = tiny.scheduler("ddim")
    scheduler.set_timesteps(10)
    fitted = baselines.budget_schedules(table, scheduler.timesteps.tolist(), 0.4)
    assert {"fora", "forecast_fora", "toca", "uniform"} <= set(fitted)
    assert abs(table.saved_fraction(fitted["uniform"]) - 0.4) < 0.15


def test_the_recipe_learns_under_a_time_budget(tmp_path):
    common = ["experiment=learn", "model=tiny", "learn.num_steps=8", "data.train_size=8", "data.val_size=4",
              "data.batch_size=4", "trainer.max_epochs=1", "learn.refine_passes=0", "learn.budget=0.3",
              "learn.budget_unit=time", "learn.time_batch=2"]  # fmt: skip
    out = train(tmp_path / "time", *common)
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

"""Pareto sweeps (`python -m diffsparse.evaluate --budgets ...`) on the tiny random model: per-budget folders,
the combined table and plots, dense sampled and timed once, schedules at one budget or all, bad budgets refused
before anything is loaded; and the paired ΔPSNR column."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

import diffsparse.evaluate.harness as harness
from diffsparse.evaluate.cli import EvalConfig, UsageError
from diffsparse.evaluate.command import main
from diffsparse.evaluate.compare import add_paired_differences
from diffsparse.evaluate.pareto import sweep
from diffsparse.models.loading import load_model
from diffsparse.schedule import Schedule

STEPS = 5
FAST = ["--model", "tiny", "--quick", "--threads", "1", "--feature-net", "none", "--rounds", "1", "--samples", "6",
        "--timing-samples", "2", "--calibration-samples", "2", "--bootstrap-rounds", "50"]  # fmt: skip


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def schedule(tmp_path_factory):
    path = tmp_path_factory.mktemp("schedule") / "u50.json"
    Schedule.uniform(load_model("tiny").transformer, STEPS, 0.5).save(path)
    return path


@pytest.fixture(scope="module")
def swept(tmp_path_factory, schedule):
    """One sweep at 30 % and 50 %, with every sampling and timing run of the runner recorded."""
    out = tmp_path_factory.mktemp("pareto")
    runs, timed = [], []
    run, timing_run = harness.Runner.run, harness.Runner.timing_run

    def recorded_run(self, method, count=None):
        runs.append((method.name, count))
        return run(self, method, count)

    def recorded_timing_run(self, method, count):
        timed.append(method.name)
        return timing_run(self, method, count)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness.Runner, "run", recorded_run)
        mp.setattr(harness.Runner, "timing_run", recorded_timing_run)
        schedules = ["--schedule", f"mine@0.3={schedule}", "--schedule", f"everywhere={schedule}"]
        main([*FAST, "--budgets", "0.3", "0.5", "--methods", "fora", "uniform", "fbc", "--compare-to", "fora",
              *schedules, "--out", str(out)])  # fmt: skip
    return out, runs, timed


def test_a_sweep_writes_every_budget_and_one_row_per_method_and_budget(swept):
    out, _, _ = swept
    for folder, extra in (("budget-0.30", ["mine", "everywhere"]), ("budget-0.50", ["everywhere"])):
        rows = _rows(out / folder / "results.csv")
        assert [r["method"] for r in rows] == ["dense", "fora", "uniform", "FirstBlockCache", *extra]
        assert (out / folder / "overview.png").is_file() and (out / folder / "samples" / "dense.png").is_file()
        assert json.loads((out / folder / "results.json").read_text())["config"]["budget"] == float(folder[-4:])
    rows = _rows(out / "pareto.csv")
    pairs = [(r["method"], r["budget"]) for r in rows]
    assert pairs[0] == ("dense", "") and len(pairs) == len(set(pairs))
    expected = {(m, b) for m in ("fora", "uniform", "FirstBlockCache", "everywhere") for b in ("0.3", "0.5")}
    assert set(pairs[1:]) == expected | {("mine", "0.3")}
    assert len(json.loads((out / "pareto.json").read_text())["rows"]) == len(rows)
    table = (out / "pareto.md").read_text()
    assert table.count("| dense |") == 1 and "Dense: sampled and timed once" in table and "ΔPSNR vs fora ↑" in table
    for name in ("pareto_psnr.png", "pareto_l2.png"):
        with Image.open(out / name) as image:
            assert image.size[0] > 0 and image.size[1] > 0


def test_dense_is_sampled_and_timed_once_for_every_budget(swept):
    _, runs, timed = swept
    dense = [count for name, count in runs if name == "dense"]
    assert dense.count(None) == 1  # the one full dense run; at most one more on the calibration samples (fbc)
    assert len(dense) <= 2
    assert timed.count("dense") == 1 and len(timed) == 1 + 4 * 2 + 1  # dense, 4 rows x 2 budgets, mine at 30 %


def test_the_same_schedule_measures_the_same_at_every_budget_and_the_paired_psnr_agrees(swept):
    out, _, _ = swept
    rows = {(r["method"], r["budget"]): r for r in _rows(out / "pareto.csv")}
    assert rows[("everywhere", "0.3")]["psnr"] == rows[("everywhere", "0.5")]["psnr"]  # same schedule, same noise
    assert rows[("mine", "0.3")]["psnr"] == rows[("everywhere", "0.3")]["psnr"]
    for (name, budget), r in rows.items():
        if name in ("dense", "fora"):
            assert r["dpsnr"] == ""
            continue
        # the mean of the paired differences is the difference of the means
        gap = float(r["psnr"]) - float(rows[("fora", budget)]["psnr"])
        assert float(r["dpsnr"]) == pytest.approx(gap)
        assert float(r["dpsnr_low"]) <= float(r["dpsnr"]) <= float(r["dpsnr_high"])


def test_paired_psnr_says_which_row_is_better_beyond_noise():
    rng = np.random.default_rng(0)
    base = rng.normal(20.0, 3.0, 64)  # samples differ a lot; the better row is 1 dB better on every one
    per_sample = {"a": {"psnr": base + 1.0 + rng.normal(0, 0.1, 64), "l2": np.full(64, 0.01)},
                  "b": {"psnr": base, "l2": np.full(64, 0.02)}}  # fmt: skip
    rows = [{"method": "dense"}, {"method": "a"}, {"method": "b"}]
    add_paired_differences(rows, {}, per_sample, None, EvalConfig(compare_to="b", bootstrap_rounds=200))
    dense, a, b = rows
    assert "dpsnr" not in dense and "dpsnr" not in b  # nothing to pair dense with; b is the base
    assert 0.9 < a["dpsnr"].low <= a["dpsnr"].value <= a["dpsnr"].high < 1.1
    assert a["dl2"].value == pytest.approx(-0.01) and a["dl2"].high < 0


@pytest.fixture
def no_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("got past the checks: a model was loaded or sampled")

    for name in ("load_model", "sample", "sample_batched"):
        monkeypatch.setattr(harness, name, fail)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budgets", "0", "0.5"], "--budgets must each be in (0, 1), got 0.0"),
        (["--budgets", "0.3", "1"], "--budgets must each be in (0, 1), got 1.0"),
        (["--budgets", "0.3", "-0.2"], "--budgets must each be in (0, 1)"),
        (["--budgets", "0.3", "0.3"], "given twice"),
        (["--budget", "0.4", "--budgets", "0.3", "0.5"], "--budget 0.4 and --budgets: give one"),
        (["--budgets", "0.3", "0.5", "--schedule", "mine@0.4={schedule}"], "0.4 is not a budget of this run"),
        (["--budgets", "0.3", "--schedule", "mine@x={schedule}"], "takes a budget B"),
        (["--budgets", "0.3", "0.5", "--schedule", "mine={schedule}", "--schedule", "mine@0.3={schedule}"],
         "two extra rows of that name"),
    ],
)  # fmt: skip
def test_bad_budgets_are_refused_before_anything_is_loaded(argv, message, schedule, no_loading, tmp_path, capsys):
    argv = [a.format(schedule=schedule) for a in argv]
    with pytest.raises(SystemExit) as stop:
        main(["--model", "tiny", *argv, "--out", str(tmp_path)])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_one_row_name_may_take_a_schedule_per_budget_and_checks_run_without_the_command_line(schedule, no_loading):
    items = [f"mine@0.3={schedule}", f"mine@0.5={schedule}"]
    with pytest.raises(UsageError, match="must each be in"):
        sweep(EvalConfig(model="tiny", budgets=[0.3, 1.5], schedules=items))
    with pytest.raises(AssertionError, match="got past the checks"):  # valid: it goes on to load the model
        sweep(EvalConfig(model="tiny", budgets=[0.3, 0.5], schedules=items, methods=["fora"], compare_to="mine"))


def test_a_budget_the_schedules_cannot_meet_is_refused_before_any_sampling(monkeypatch, tmp_path, capsys):
    def fail(*args, **kwargs):
        raise AssertionError("sampled before refusing")

    monkeypatch.setattr(harness, "sample_batched", fail)
    with pytest.raises(SystemExit) as stop:
        main([*FAST, "--steps", "1", "--budgets", "0.3", "0.5", "--methods", "fora", "--out", str(tmp_path)])
    assert stop.value.code == 2 and "at least 2 steps" in capsys.readouterr().err

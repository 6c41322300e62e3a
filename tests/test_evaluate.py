"""The evaluation harness in --quick mode on a tiny random model: outputs, repeatability, MAC accounting, and
settings that cannot work refused before anything is sampled."""

import csv
import dataclasses
import importlib.util
import json
import logging
import re

import pytest

import diffsparse.evaluate.harness as evaluate_module
from diffsparse.evaluate.command import main
from diffsparse.evaluate.harness import ALL_METHODS, EvalConfig, UsageError, evaluate, parse_args
from diffsparse.evaluate.timing import allocator_note

QUALITY = ("fd", "fd_low", "fd_high", "accuracy", "l2", "psnr", "ssim", "gmacs_per_image")


def _rows(path):
    with open(path / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    outs = []
    for i in range(2):
        out = tmp_path_factory.mktemp(f"eval{i}")
        main(["--model", "tiny", "--quick", "--threads", "1", "--feature-net", "digits", "--out", str(out)])
        outs.append(out)
    return outs


def test_quick_run_writes_table_grids_and_overview(two_runs):
    out = two_runs[0]
    rows = _rows(out)
    peers = ["cache-dit"] if importlib.util.find_spec("cache_dit") else []  # skipped, with a note, where missing
    assert [r["method"] for r in rows] == [
        "dense", "fewer-steps", "fora", "forecast-fora", "forecast-warmup", "toca", "duca", "uniform", "snr-stages",
        "FirstBlockCache",
        "TaylorSeer", "PAB", *peers,
    ]  # fmt: skip
    assert len(rows) == len(ALL_METHODS) - (not peers)
    for r in rows:
        assert (out / "samples" / f"{r['method']}.png").is_file()
        assert float(r["fd_low"]) <= float(r["fd"]) <= float(r["fd_high"])
    assert (out / "overview.png").is_file() and "| method |" in (out / "results.md").read_text()
    dense = rows[0]
    assert float(dense["mac_reduction"]) == 1.0 and dense["psnr"] == ""
    assert int(rows[1]["steps"]) < int(dense["steps"])
    record = json.loads((out / "results.json").read_text())
    assert record["config"]["steps"] == 5 and record["config"]["samples"] == 20
    # How the timed process allocated host memory: in the JSON and in the table's footnote (on glibc).
    assert record["host_allocator"] == allocator_note()
    assert allocator_note() in (out / "results.md").read_text()


def test_same_seed_gives_identical_quality_columns(two_runs):
    a, b = (_rows(p) for p in two_runs)
    for ra, rb in zip(a, b, strict=True):
        assert {k: ra[k] for k in QUALITY} == {k: rb[k] for k in QUALITY}, ra["method"]


def test_counted_macs_of_fora_match_the_analytic_table(two_runs):
    rows = {r["method"]: r for r in _rows(two_runs[0])}
    # 5 steps, FORA interval 2 or 3: the units cost nothing at reuse steps; only "other" MACs remain there
    assert 1.0 < float(rows["fora"]["mac_reduction"]) < 5.0
    assert float(rows["fewer-steps"]["mac_reduction"]) == pytest.approx(5 / int(rows["fewer-steps"]["steps"]))


def test_the_command_line_is_made_from_the_config_fields(capsys):
    cfg, default = parse_args([]), EvalConfig()
    differs = {f.name for f in dataclasses.fields(EvalConfig) if getattr(cfg, f.name) != getattr(default, f.name)}
    assert differs == {"sampler"}  # on the command line the model's noise schedule picks it
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(EvalConfig):
        assert (f.metadata["flag"] or "--" + f.name.replace("_", "-")) in text
        assert f.metadata["help"] is None or f.metadata["help"][:30] in " ".join(text.split())


def test_bad_arguments_stop_before_any_work(capsys):
    for argv in (["--budget", "1.5"], ["--samples", "0"], ["--methods", "nope"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
    assert parse_args(["--quick", "--steps", "7"]).steps == 7  # explicit values win over --quick


@pytest.fixture
def no_sampling(monkeypatch):
    """Loading a model or sampling fails the test: the check under test must come first."""

    def fail(*args, **kwargs):
        raise AssertionError("got past the checks: a model was loaded or sampled")

    for name in ("load_model", "sample", "sample_batched"):
        monkeypatch.setattr(evaluate_module, name, fail)


COUNTS = ("steps", "samples", "batch-size", "rounds", "timing-samples", "calibration-samples", "bootstrap-rounds")
# (command line, the same as EvalConfig fields, what the refusal says); {schedule}: a schedule file, {file}: a
# file that is not a folder, {tmp}: an empty folder
BAD = {
    "out-is-a-file": (["--out", "{file}"], {"output_dir": "{file}"}, "is a file, not a folder"),
    "out-under-a-file": (["--out", "{file}/x"], {"output_dir": "{file}/x"}, "is a file, not a folder"),
    "schedule-named-like-a-built-in-row": (["--schedule", "toca={schedule}"], {"schedules": ["toca={schedule}"]},
                                           "built-in row"),
    "schedule-named-like-a-diffusers-row": (["--schedule", "PAB={schedule}"], {"schedules": ["PAB={schedule}"]},
                                            "built-in row"),
    "schedule-name-leaving-out": (["--schedule", "../../x={schedule}"], {"schedules": ["../../x={schedule}"]},
                                  "plain file name"),
    "schedule-name-in-a-folder": (["--schedule", "a/b={schedule}"], {"schedules": ["a/b={schedule}"]},
                                  "plain file name"),
    "two-rows-of-one-name": (["--schedule", "mine={schedule}", "--schedule", "mine={schedule}"],
                             {"schedules": ["mine={schedule}", "mine={schedule}"]}, "two extra rows"),
    "compare-to-nonsense": (["--compare-to", "nonsense"], {"compare_to": "nonsense"}, "not a row"),
    "compare-to-a-row-not-run": (["--methods", "dense", "fora", "--compare-to", "toca"],
                                 {"methods": ["dense", "fora"], "compare_to": "toca"}, "not a row"),
    "feature-net-nowhere": (["--feature-net", "{tmp}"], {"feature_net": "{tmp}"}, "saved feature network"),
    "captions-nowhere": (["--captions", "{tmp}/c.safetensors"], {"captions": "{tmp}/c.safetensors"},
                         "python -m diffsparse.captions"),
    "budget-tolerance": (["--budget-tolerance", "-0.1"], {"budget_tolerance": -0.1}, "--budget-tolerance"),
    "time-table-for-a-mac-budget": (["--time-table", "{schedule}"], {"time_table": "{schedule}"},
                                    "with --budget-unit time"),
    "time-table-nowhere": (["--budget-unit", "time", "--time-table", "{tmp}/t.json"],
                           {"budget_unit": "time", "time_table": "{tmp}/t.json"}, "give an existing time_table.json"),
    **{f"{k}<1": ([f"--{k}", "0"], {k.replace("-", "_"): 0}, f"--{k} must be at least 1") for k in COUNTS},
}  # fmt: skip


def _filled(value, places: dict):
    if isinstance(value, str):
        return value.format(**places)
    if isinstance(value, list):
        return [_filled(v, places) for v in value]
    return value


@pytest.mark.parametrize("case", list(BAD))
def test_bad_settings_are_refused_before_anything_is_loaded_or_sampled(case, tmp_path, no_sampling, capsys):
    (tmp_path / "schedule.json").write_text("{}")
    (tmp_path / "results.md").write_text("")
    places = {"schedule": tmp_path / "schedule.json", "file": tmp_path / "results.md", "tmp": tmp_path}
    argv, fields, message = BAD[case]
    with pytest.raises(SystemExit):
        parse_args(["--model", "tiny", *_filled(argv, places)])
    assert message in capsys.readouterr().err
    fields = {k: _filled(v, places) for k, v in fields.items()}
    with pytest.raises(UsageError, match=re.escape(message)):  # the same checks without the command line
        evaluate(EvalConfig(model="tiny", **fields))


def test_compare_to_takes_a_row_or_a_method_key_and_defaults_to_toca_when_run(tmp_path):
    schedule = tmp_path / "mine.json"
    schedule.write_text("{}")
    assert parse_args([]).compare_to == "toca"
    assert parse_args(["--compare-to", "fbc"]).compare_to == "FirstBlockCache"
    assert parse_args(["--compare-to", "none"]).compare_to is None
    assert parse_args(["--methods", "dense", "fora"]).compare_to is None  # toca not run: no Δ columns, no error
    assert parse_args(["--schedule", f"mine={schedule}", "--compare-to", "mine"]).compare_to == "mine"


def test_rows_off_the_budget_are_flagged_in_the_table_and_the_log(tmp_path, caplog):
    out = tmp_path / "eval"
    with caplog.at_level(logging.WARNING, logger="diffsparse.evaluate.harness"):
        main(["--model", "tiny", "--quick", "--threads", "1", "--budget", "0.95", "--steps", "1",
              "--methods", "dense", "fewer-steps", "pab", "--out", str(out)])  # fmt: skip
    rows = {r["method"]: r for r in _rows(out)}
    assert rows["dense"]["off_budget"] == "False"
    for name in ("fewer-steps", "PAB"):  # one step cannot save anything
        assert rows[name]["off_budget"] == "True" and float(rows[name]["saved_macs"]) < 0.9
        assert f"{name} saves" in caplog.text
    table = (out / "results.md").read_text()
    assert "1.00x ⚠" in table and "⚠: the row's MAC saving is more than 5%" in table


def test_a_budget_the_hand_made_schedules_cannot_meet_is_refused_before_sampling(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("sampled before refusing")

    monkeypatch.setattr(evaluate_module, "sample_batched", fail)
    with pytest.raises(UsageError, match="at least 2 steps"):
        evaluate(
            parse_args(["--model", "tiny", "--quick", "--budget", "0.95", "--steps", "1", "--out", str(tmp_path)])
        )


def test_a_time_budget_fits_the_hand_made_rows_on_a_measured_time_table(tmp_path, monkeypatch, caplog):
    """`--budget-unit time`: the hand-made rows are the allocators fitted on the time table measured at the start
    (saved beside the results); FirstBlockCache stays fitted on MACs, and says so. A second run reuses the table
    (`--time-table`) without timing the model again."""
    from diffsparse.accounting.times import TimeTable
    from diffsparse.allocate import baselines
    from diffsparse.evaluate.methods import describe
    from diffsparse.models.handle import ModelHandle
    from diffsparse.models.loading import load_model

    out = tmp_path / "eval"
    args = [
        "--model",
        "tiny",
        "--quick",
        "--threads",
        "1",
        "--methods",
        "dense",
        "toca",
        "fora",
        "fbc",
        "--feature-net",
        "none",
        "--budget",
        "0.3",
    ]  # fmt: skip (5 steps: at most 0.45 of the time to save)
    with caplog.at_level(logging.WARNING, logger="diffsparse.evaluate.harness"):
        main([*args, "--budget-unit", "time", "--out", str(out)])
    table = TimeTable.load(out / "time_table.json")
    ref = load_model("tiny")
    assert tuple(table.units) == tuple(ref.mac_table().units)
    scheduler = ref.scheduler("ddim")
    cfg = parse_args(args)
    scheduler.set_timesteps(cfg.steps)
    fitted = baselines.budget_schedules(table, scheduler.timesteps.tolist(), cfg.budget)
    rows = {r["method"]: r for r in _rows(out)}
    for name in ("toca", "fora"):
        knobs = {k: v for k, v in fitted[name].meta.items() if k != "method"}
        assert rows[name]["setting"] == describe(knobs)
    assert "FirstBlockCache are fitted on their measured MACs, not on time" in caplog.text
    table = (out / "results.md").read_text()
    assert "budget 30% of dense time (as the time table predicts it" in table and "⚠" not in table

    monkeypatch.setattr(ModelHandle, "time_table", lambda *a, **k: pytest.fail("timed again"))
    again = tmp_path / "again"
    main([*args, "--budget-unit", "time", "--time-table", str(out / "time_table.json"), "--out", str(again)])
    assert {r["method"]: r["setting"] for r in _rows(again)} == {r["method"]: r["setting"] for r in _rows(out)}

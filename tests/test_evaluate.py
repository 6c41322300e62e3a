"""The evaluation harness in --quick mode on a tiny random model: outputs, repeatability, MAC accounting."""

import csv
import json

import pytest

from diffsparse.evaluate import ALL_METHODS, main, parse_args

QUALITY = ("fd", "fd_low", "fd_high", "accuracy", "l2", "psnr", "ssim", "gmacs_per_image")


def _rows(path):
    with open(path / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    outs = []
    for i in range(2):
        out = tmp_path_factory.mktemp(f"eval{i}")
        main(["--model", "tiny", "--quick", "--threads", "1", "--out", str(out)])
        outs.append(out)
    return outs


def test_quick_run_writes_table_grids_and_overview(two_runs):
    out = two_runs[0]
    rows = _rows(out)
    assert [r["method"] for r in rows] == [
        "dense", "fewer-steps", "fora", "toca", "duca", "uniform", "snr-stages", "FirstBlockCache", "TaylorSeer", "PAB"
    ]  # fmt: skip
    assert len(rows) == len(ALL_METHODS)
    for r in rows:
        assert (out / "samples" / f"{r['method']}.png").is_file()
        assert float(r["fd_low"]) <= float(r["fd"]) <= float(r["fd_high"])
    assert (out / "overview.png").is_file() and "| method |" in (out / "results.md").read_text()
    dense = rows[0]
    assert float(dense["mac_reduction"]) == 1.0 and dense["psnr"] == ""
    assert int(rows[1]["steps"]) < int(dense["steps"])
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["steps"] == 5 and config["samples"] == 20


def test_same_seed_gives_identical_quality_columns(two_runs):
    a, b = (_rows(p) for p in two_runs)
    for ra, rb in zip(a, b, strict=True):
        assert {k: ra[k] for k in QUALITY} == {k: rb[k] for k in QUALITY}, ra["method"]


def test_counted_macs_of_fora_match_the_analytic_table(two_runs):
    rows = {r["method"]: r for r in _rows(two_runs[0])}
    # 5 steps, FORA interval 2 or 3: the units cost nothing at reuse steps; only "other" MACs remain there
    assert 1.0 < float(rows["fora"]["mac_reduction"]) < 5.0
    assert float(rows["fewer-steps"]["mac_reduction"]) == pytest.approx(5 / int(rows["fewer-steps"]["steps"]))


def test_bad_arguments_stop_before_any_work(capsys):
    for argv in (["--budget", "1.5"], ["--samples", "0"], ["--methods", "nope"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
    assert parse_args(["--quick", "--steps", "7"]).steps == 7  # explicit values win over --quick

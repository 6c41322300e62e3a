import json

import pytest

from diffsparse import bench


def test_bench_runs_on_a_tiny_model_and_writes_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = bench.main(["--size", "tiny", "--tokens", "16", "--steps", "4", "--rounds", "1", "--json", str(out)])
    assert [r["method"] for r in rows] == ["dense", "uniform-0.5", "uniform-0.75", "toca-like"]
    assert json.loads(out.read_text()) == rows
    dense, half, three_quarters, _ = rows
    assert dense["mac_reduction"] == 1.0
    assert 1.0 < half["mac_reduction"] < three_quarters["mac_reduction"]
    for r in rows:
        assert r["speedup_min"] <= r["speedup"] <= r["speedup_max"]
        assert r["efficiency"] == r["speedup"] / r["mac_reduction"]
    assert "| uniform-0.75 |" in capsys.readouterr().out


def test_bench_schedules_are_chosen_by_name():
    rows = bench.main(
        ["--size", "tiny", "--tokens", "16", "--steps", "3", "--rounds", "1", "--schedules", "uniform-1.0"]
    )
    assert [r["method"] for r in rows] == ["dense", "uniform-1.0"]
    assert rows[1]["mac_reduction"] > 2.0  # two of three steps reuse every unit (the rest still runs)


def test_bench_rejects_unknown_schedules():
    with pytest.raises(ValueError, match="Unknown schedule 'fora'"):
        bench.make_schedules(["fora"], ["transformer_blocks.0.ff"], 4)


@pytest.mark.parametrize("model", ["flux", "wan"])
def test_bench_rows_for_the_flow_models(model, capsys):
    rows = bench.main(["--model", model, "--size", "tiny", "--tokens", "16", "--steps", "3", "--rounds", "1"])
    assert [r["method"] for r in rows] == ["dense", "uniform-0.5", "uniform-0.75", "toca-like"]
    assert rows[0]["model"] == f"{model}-tiny" and rows[1]["selector"] == "norm"
    assert 1.0 < rows[1]["mac_reduction"] < rows[2]["mac_reduction"]
    assert f"{model}-tiny, 16 tokens" in capsys.readouterr().out

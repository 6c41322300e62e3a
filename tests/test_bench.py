import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffsparse.evaluate import bench, bench_cli


def test_bench_runs_on_a_tiny_model_and_writes_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = bench_cli.main(["--size", "tiny", "--tokens", "16", "--steps", "4", "--rounds", "1", "--json", str(out)])
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
    rows = bench_cli.main(
        ["--size", "tiny", "--tokens", "16", "--steps", "3", "--rounds", "1", "--schedules", "uniform-1.0"]
    )
    assert [r["method"] for r in rows] == ["dense", "uniform-1.0"]
    assert rows[1]["mac_reduction"] > 2.0  # two of three steps reuse every unit (the rest still runs)


def test_bench_rejects_unknown_schedules():
    with pytest.raises(ValueError, match="Unknown schedule 'fora'"):
        bench.make_schedules(["fora"], ["transformer_blocks.0.ff"], 4)


@pytest.mark.parametrize("model", ["flux", "wan"])
def test_bench_rows_for_the_flow_models(model, capsys):
    rows = bench_cli.main(["--model", model, "--size", "tiny", "--tokens", "16", "--steps", "3", "--rounds", "1"])
    assert [r["method"] for r in rows] == ["dense", "uniform-0.5", "uniform-0.75", "toca-like"]
    assert rows[0]["model"] == f"{model}-tiny" and rows[1]["selector"] == "norm"
    assert 1.0 < rows[1]["mac_reduction"] < rows[2]["mac_reduction"]
    assert f"{model}-tiny, 16 tokens" in capsys.readouterr().out


BAD_ARGUMENTS = [
    (["--schedules", "uniform-abc"], r"uniform-<sparsity> needs a sparsity from 0 to 1"),
    (["--schedules", "uniform-0.5,uniform-1.5"], r"'uniform-1.5'.*from 0 to 1"),
    (["--schedules", "uniform-nan"], r"from 0 to 1"),
    (["--schedules", "fora"], r"Unknown schedule 'fora'"),
    (["--schedules", "pruned-x"], r"pruned-<fraction> needs a fraction"),
    (["--schedules", "pruned-0.01"], r"pruned-<fraction> needs a fraction"),
    (["--model", "wan", "--schedules", "pruned-0.3"], r"for DiT and PixArt only"),
    (["--tokens", "0"], r"--tokens must be a positive square number"),
    (["--tokens", "-4"], r"--tokens must be a positive square number"),
    (["--tokens", "15"], r"--tokens must be a positive square number"),
    (["--rounds", "0"], r"--rounds must be at least 1, got 0"),
    (["--batch", "0"], r"--batch must be at least 1, got 0"),
    (["--batch", "3"], r"--batch must be even for dit"),
    (["--steps", "0"], r"--steps must be at least 1"),
    (["--model", "wan", "--frames", "0"], r"--frames must be at least 1"),
    (["--threads", "0"], r"--threads must be at least 1"),
    (["--size", "huge"], r"--size 'huge' is not a dit size"),
    (["--model", "flux", "--size", "XL/2"], r"not a flux size"),
    (["--selector", "best"], r"--selector best: Unknown selector"),
    (["--model", "wan", "--selector", "toca"], r"--selector toca: .*attention maps"),
    (["--device", "gpu"], r"--device 'gpu' is not a device the bench runs on"),
    (["--device", "meta"], r"the bench runs on cpu or cuda"),
    (["--dtype", "float64"], r"argument --dtype: invalid choice"),
]


@pytest.mark.parametrize("argv, message", BAD_ARGUMENTS, ids=[" ".join(argv) for argv, _ in BAD_ARGUMENTS])
def test_bench_refuses_bad_arguments_before_building_anything(argv, message, monkeypatch, capsys):
    def no_model(*a, **k):
        raise AssertionError("a model was built for bad arguments")

    monkeypatch.setattr(bench, "bench_model", no_model)
    with pytest.raises(SystemExit) as info:
        bench_cli.main(["--size", "tiny", *argv] if "--size" not in argv else argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m diffsparse.bench" in err
    assert re.search(message, err), err


def test_bench_refuses_json_paths_it_cannot_write(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "bench_model", lambda *a, **k: pytest.fail("a model was built for bad arguments"))
    for path, message in [
        (tmp_path, "is a directory: give a file path"),
        (tmp_path / "missing" / "rows.json", "is not an existing folder"),
        (tmp_path / "file.txt" / "rows.json", "is not an existing folder"),
    ]:
        (tmp_path / "file.txt").write_text("")
        with pytest.raises(SystemExit) as info:
            bench_cli.main(["--size", "tiny", "--json", str(path)])
        assert info.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # nothing created or half-written


def test_bench_command_line_exits_nonzero_with_a_message():
    proc = subprocess.run(
        [sys.executable, "-m", "diffsparse.bench", "--schedules", "uniform-abc"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2
    assert "uniform-<sparsity> needs a sparsity from 0 to 1" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_refuses_cuda_where_there_is_none(monkeypatch, capsys):
    monkeypatch.setattr(bench, "bench_model", lambda *a, **k: pytest.fail("a model was built for bad arguments"))
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        bench_cli.main(["--size", "tiny", "--device", "cuda"])
    assert info.value.code == 2 and "CUDA is not available here" in capsys.readouterr().err


def test_bench_in_bf16_and_compiled(monkeypatch, capsys):
    """`--dtype bfloat16 --compile`: the rows say so, dense compiles the whole model and the cached rows their
    units (dynamo's eager backend here, to keep the test fast: the path is the same, only the code generator
    differs)."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compile_(*a, **{**k, "backend": "eager"}))
    rows = bench_cli.main(
        ["--size", "tiny", "--tokens", "16", "--steps", "3", "--rounds", "1", "--schedules", "uniform-0.5",
         "--dtype", "bfloat16", "--compile"]
    )  # fmt: skip
    assert [(r["dtype"], r["compiled"], r["device"]) for r in rows] == [("bfloat16", True, "cpu")] * 2
    assert rows[0]["graphs"] >= 1 and rows[1]["graphs"] >= 1
    out = capsys.readouterr().out
    assert "bfloat16, compiled" in out and "| graphs |" in out


def test_bench_sweep_writes_its_rows_table_and_plot(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    rows = bench_cli.main(
        ["--sweep", "--size", "tiny", "--sweep-tokens", "16,64", "--sweep-steps", "3", "--rounds", "1",
         "--json", str(out)]
    )  # fmt: skip
    cells = [(r["tokens"], r["steps"], r["method"]) for r in rows]
    assert cells == [(t, 3, m) for t in (16, 64) for m in ("dense", "uniform-0.5", "uniform-0.75")]
    assert json.loads(out.read_text()) == rows
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| 64 | 3 | uniform-0.75 |" in printed and "cells below efficiency 0.9" in printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sweep", "--sweep-tokens", "16,15"], "--sweep-tokens must be square numbers"),
        (["--sweep", "--sweep-steps", "0"], "--sweep-steps must be comma-separated positive integers"),
        (["--sweep", "--sweep-steps", "ten"], "--sweep-steps must be comma-separated positive integers"),
        (["--plot", "x.png"], "--plot is for --sweep"),
    ],
)
def test_bench_sweep_refuses_bad_grids(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(bench, "bench_model", lambda *a, **k: pytest.fail("a model was built for bad arguments"))
    with pytest.raises(SystemExit) as info:
        bench_cli.main(["--size", "tiny", *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_bench_rows_with_key_value_reuse(capsys):
    rows = bench_cli.main(
        ["--size", "tiny", "--tokens", "16", "--steps", "4", "--rounds", "1", "--schedules", "uniform-0.5,toca-like",
         "--reuse-kv"]
    )  # fmt: skip
    by_name = {r["method"]: r for r in rows}
    assert list(by_name) == ["dense", "uniform-0.5", "toca-like", "uniform-0.5+kv", "toca-like+kv"]
    for name in ("uniform-0.5", "toca-like"):  # the same schedule, fewer MACs: the reused keys are not projected
        assert by_name[f"{name}+kv"]["mac_reduction"] > by_name[name]["mac_reduction"]
    assert "| toca-like+kv |" in capsys.readouterr().out

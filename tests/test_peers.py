"""Peers in the evaluation harness: cache-dit (where installed) saves MACs on a tiny random DiT, fitted to a budget,
on a copy of the model, with a fresh cache at every sampling call; where it is not installed its row is skipped
with a note in the log and under the table, not silently left out."""

import csv
import logging
import sys

import pytest
import torch

from diffsparse.accounting.macs import flop_counter
from diffsparse.evaluate.builders import BUILDERS
from diffsparse.evaluate.harness import evaluate, parse_args
from diffsparse.evaluate.methods import Method, Unavailable, applied
from diffsparse.evaluate.peers import NOT_INSTALLED, cache_dit_method, unavailable
from diffsparse.models.loading import load_model
from diffsparse.models.sampling import initial_noise, sample

STEPS = 12


def _rows(path):
    with open(path / "results.csv") as f:
        return list(csv.DictReader(f))


def _argv(out, *extra):
    return ["--model", "tiny", "--steps", str(STEPS), "--samples", "6", "--calibration-samples", "3",
            "--timing-samples", "2", "--rounds", "1", "--bootstrap-rounds", "20", "--threads", "1",
            "--feature-net", "none", "--out", str(out), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return load_model("tiny")


def _sample(ref, model, noise, labels):
    with torch.no_grad(), flop_counter() as counter:
        x = sample(model, ref.scheduler("ddim"), labels, noise, STEPS, 1.5, null_class=ref.num_classes)
    return x, counter.get_total_flops()


def test_cache_dit_saves_macs_on_a_copy_with_a_fresh_cache_at_every_call(tiny):
    pytest.importorskip("cache_dit")  # the other case: test_without_cache_dit_the_row_is_skipped_with_a_note
    noise, labels = initial_noise(4, tiny.sample_shape, 0), torch.arange(4) % tiny.num_classes
    dense, dense_flops = _sample(tiny, tiny.transformer, noise, labels)
    method = cache_dit_method(STEPS, threshold=1.0)
    with applied(method, tiny.transformer) as model:
        assert model is not tiny.transformer
        first, flops = _sample(tiny, model, noise, labels)
        second, flops_again = _sample(tiny, model, noise, labels)  # the cache state of the first call must not leak
    with applied(method, tiny.transformer) as model:
        fresh, _ = _sample(tiny, model, noise, labels)
    assert 0.1 < 1 - flops / dense_flops < 0.6  # blocks skipped at cached steps (the first block always runs)
    assert flops_again == flops
    assert torch.equal(first, second) and torch.equal(first, fresh)
    assert torch.isfinite(first).all() and not torch.equal(first, dense)
    assert not hasattr(tiny.transformer, "_is_cached")  # the original is untouched: cache-dit went on the copy
    assert torch.equal(_sample(tiny, tiny.transformer, noise, labels)[0], dense)


def test_cache_dit_row_is_fitted_to_the_budget(tmp_path, tiny):
    pytest.importorskip("cache_dit")
    rows = evaluate(parse_args(_argv(tmp_path, "--methods", "dense", "cache-dit", "--budget", "0.25")))
    assert [r["method"] for r in rows] == ["dense", "cache-dit"]
    row = rows[1]
    assert row["saved_macs"] == pytest.approx(0.25, abs=0.1)
    assert row["psnr"].value > 10 and "threshold=" in row["setting"] and "taylorseer=1" in row["setting"]
    assert "Row skipped" not in (tmp_path / "results.md").read_text()


def test_without_cache_dit_the_row_is_skipped_with_a_note(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "cache_dit", None)  # `import cache_dit` raises ImportError
    assert "cache-dit" in BUILDERS and unavailable("cache-dit") == NOT_INSTALLED
    assert unavailable("fbc") is None
    with pytest.raises(Unavailable, match="not installed"):
        cache_dit_method(STEPS, 0.1)
    with caplog.at_level(logging.WARNING, logger="diffsparse.evaluate.harness"):
        evaluate(parse_args(_argv(tmp_path, "--methods", "dense", "cache-dit")))
    assert [r["method"] for r in _rows(tmp_path)] == ["dense"]
    assert f"cache-dit: row skipped ({NOT_INSTALLED})" in caplog.text
    assert f"Row skipped: {NOT_INSTALLED}." in (tmp_path / "results.md").read_text()


def test_a_method_with_its_own_apply_runs_on_a_copy(tiny):
    seen = []
    method = Method("custom", STEPS, apply=seen.append)
    with applied(method, tiny.transformer) as model:
        assert seen == [model] and model is not tiny.transformer

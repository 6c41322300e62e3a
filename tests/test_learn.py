"""Learning a schedule end to end on a tiny model: both stages, resume, data-parallel equals one process."""

import json
import math
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from diffsparse import Schedule, cacheable_units

ROOT = Path(__file__).resolve().parents[1]


def train(out: Path, *overrides: str) -> Path:
    """`python train.py experiment=tiny_stage* ...` into `out`, with the l2 loss and the CSV logger."""
    args = ["learn.loss=l2", "logger=csv", f"output_dir={out}", f"hydra.run.dir={out}"]
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    return train(tmp_path_factory.mktemp("s1"), "experiment=tiny_stage1", "trainer.max_epochs=2")


def test_both_stages_export_a_schedule_within_budget(stage1, tmp_path):
    s1 = Schedule.load(stage1 / "schedule.json")
    exported = json.loads((stage1 / "metrics.json").read_text()).get("exported", "learned")  # one start: learned
    assert s1.meta["saved_macs"] >= 0.5
    # the learned schedule, or (when nothing learned validated better) the start it was learned from
    assert s1.meta["stage"] == 1 if exported == "learned" else s1.meta["start"] is True
    assert (stage1 / "costs.safetensors").is_file() and (stage1 / "schedule.png").is_file()
    s2_dir = train(tmp_path, "experiment=tiny_stage2", f"learn.stage1_checkpoint={stage1}/stage1.ckpt")
    s2 = Schedule.load(s2_dir / "schedule.json")
    assert s2.meta["stage"] == 2 and s2.meta["saved_macs"] >= 0.5
    assert set(s1.full_steps) <= set(s2.full_steps)  # eq. 9: the warm start keeps stage 1's full steps full


def test_resume_from_a_checkpoint_continues_the_run(stage1, tmp_path):
    last = f"ckpt_path={stage1}/checkpoints/last.ckpt"
    out = train(tmp_path, "experiment=tiny_stage1", "trainer.max_epochs=3", last)
    resumed = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["epoch"] == 2 and resumed["global_step"] == 6  # 2 epochs from the checkpoint, one more here
    assert (out / "stage1.ckpt").is_file()  # the best of them by validation L2, which the export used


def test_two_process_ddp_chooses_and_exports_as_one_process(tmp_path):
    """Two processes validate the starts, choose the same one and export what one process exports. With lr 0, so
    that nothing is learned: learning itself is not equal to the bit between process counts (Adam normalises the
    near-zero gradients of costs that do not matter, and float noise in those flips their sign), so a learned
    schedule may differ where costs are nearly tied."""
    common = ["experiment=tiny_stage1", "trainer.max_epochs=2", "learn.dtype=float64", "learn.lr=0.0",
              "learn.step_lr=0.0", "+learn.starts=[fora,toca]"]  # fmt: skip
    one = train(tmp_path / "one", *common, "data.batch_size=4")
    two = train(tmp_path / "two", *common, "data.batch_size=2", "trainer=ddp")  # 2 processes x 2 = one batch of 4
    assert Schedule.load(one / "schedule.json") == Schedule.load(two / "schedule.json")
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (one, two)]
    assert len(metrics[0]["start_scores"]) > 1 and metrics[0]["start"] == metrics[1]["start"]
    assert metrics[0]["start_scores"] == pytest.approx(metrics[1]["start_scores"], rel=1e-9)
    assert all(isinstance(m["best_val"], float) for m in metrics)  # spawned processes used to leave it null
    assert metrics[1]["best_val"] == pytest.approx(metrics[0]["best_val"], rel=1e-9)  # synced over processes


def test_missing_lpips_weights_stop_with_what_to_do(tmp_path, monkeypatch):
    from diffsparse.learn.losses import LpipsWeightsMissing, make_loss

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(LpipsWeightsMissing, match="learn.loss=l2"):
        make_loss("lpips")


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_flow_matching_models_learn_a_schedule_end_to_end(family, tmp_path):
    """Stage 1 then stage 2 on tiny FLUX / Wan: flow-matching rollouts through the VAE, captions from the tiny
    pipeline's own text encoders."""
    from diffsparse.backbones.flux import tiny_flux_pipeline
    from diffsparse.backbones.wan import tiny_wan_pipeline
    from diffsparse.models.captions import encode_captions, save_captions

    pipe = tiny_flux_pipeline() if family == "flux" else tiny_wan_pipeline()
    captions = [f"a {c} photo of a {a}" for c in ("red", "green", "blue", "black") for a in ("cat", "dog", "digit")]
    path = save_captions(tmp_path / "captions.safetensors", encode_captions(pipe, captions, 8), captions)
    s1 = train(tmp_path / "s1", f"experiment=tiny_{family}_stage1", f"learn.captions={path}")
    schedule = Schedule.load(s1 / "schedule.json")
    assert list(schedule.units) == cacheable_units(pipe.transformer)
    budget = schedule.meta["budget"]  # also when the export is a start
    assert schedule.meta["saved_macs"] >= budget and schedule.grid[0].max() == 0.0  # step 0 computes everything
    stage2 = [f"experiment=tiny_{family}_stage1", "learn.stage=2", f"learn.stage1_checkpoint={s1}/stage1.ckpt"]
    s2 = Schedule.load(train(tmp_path / "s2", *stage2, f"learn.captions={path}") / "schedule.json")
    assert s2.meta["stage"] == 2 and s2.meta["saved_macs"] >= budget


def test_the_recipe_starts_from_the_best_validated_start_and_never_exports_worse(tmp_path):
    common = ["experiment=learn", "model=tiny", "learn.num_steps=8", "data.train_size=8", "data.val_size=4",
              "data.batch_size=4"]  # fmt: skip
    out = train(tmp_path / "learn", *common, "trainer.max_epochs=2")
    metrics = json.loads((out / "metrics.json").read_text())
    scores = metrics["start_scores"]
    assert set(scores) == {"toca", "fora", "forecast_fora", "forecast_warmup", "uniform"}
    assert metrics["start"] == min(scores, key=scores.get) and metrics["start_val"] == min(scores.values())
    sched = Schedule.load(out / "schedule.json")
    assert sched.meta["saved_macs"] >= 0.5
    if metrics["exported"].startswith("learned"):
        assert metrics["best_val"] < metrics["start_val"]
    else:
        assert metrics["start_val"] <= metrics["best_val"] and sched.meta["kept_start"]
    # then the refinement (the recipe's passes of shifts and swaps), whose outcome the export states
    refine = metrics["refine"]
    assert refine["conditions"] == 8 and refine["rollouts"] >= 1
    assert refine["kept"] == ("refined_moves" in sched.meta) == metrics["exported"].endswith("moves")
    # nothing learned (lr 0), nothing refined: every epoch validates as the start does, and the start is exported
    off = ["trainer.max_epochs=1", "learn.lr=0.0", "learn.refine_passes=0"]
    frozen = train(tmp_path / "frozen", *common, *off)
    metrics = json.loads((frozen / "metrics.json").read_text())
    assert metrics["exported"] == "start" and metrics["best_val"] == pytest.approx(metrics["start_val"])
    assert "refine" not in metrics
    assert Schedule.load(frozen / "schedule.json").meta["method"] == metrics["start"]
    # judged by the mean per-sample log L2 (dB): starts and epochs scored by it (val/score, the checkpoints' monitor)
    logged = train(tmp_path / "log", *common, *off, "learn.judge=log_l2")
    metrics = json.loads((logged / "metrics.json").read_text())
    l2_scores, scores = scores, metrics["start_scores"]
    assert metrics["judge"] == "log_l2" and metrics["start_val"] == min(scores.values())
    # the same conditions as the first run: the mean of the logs is at most the log of the mean (Jensen), in dB
    assert all(scores[name] <= 10 * math.log10(l2_scores[name]) + 1e-4 for name in scores)
    assert metrics["best_val"] == pytest.approx(metrics["start_val"], abs=1e-4)
    log = next(logged.glob("logs/**/metrics.csv")).read_text().splitlines()[0]
    assert {"val/score", "val/log_l2", "val/l2"} <= set(log.split(","))


def test_a_checkpoint_monitor_other_than_the_judge_is_refused(tmp_path):
    """The start kept and the best epoch must be scored alike: a run judged by log L2 whose checkpoints monitor
    val/l2, not the judge's val/score, stops before training, saying what to set."""
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=tiny_stage1", "learn.loss=l2", "learn.judge=log_l2",
           "callbacks.model_checkpoint.monitor=val/l2", "logger=csv", f"output_dir={tmp_path}",
           f"hydra.run.dir={tmp_path}"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode != 0 and "set the monitor to val/score" in result.stderr
    assert not (tmp_path / "schedule.json").exists()


def test_the_recipe_in_python_is_the_recipe_of_the_config():
    from omegaconf import OmegaConf

    from diffsparse.learn.recipe import RECIPE_DATA, RECIPE_EPOCHS, RECIPE_LEARN

    config = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "experiment" / "learn.yaml"))
    assert config["learn"] == RECIPE_LEARN and config["data"] == RECIPE_DATA
    assert config["trainer"]["max_epochs"] == RECIPE_EPOCHS


def test_evaluate_learn_adds_the_recipe_s_schedule_at_every_budget(tmp_path, monkeypatch):
    import diffsparse.evaluate.learned as learned
    from diffsparse.evaluate.command import main

    monkeypatch.setattr(learned, "learn_recipe", partial(learned.learn_recipe, max_epochs=1))
    out = tmp_path / "eval"
    main(["--model", "tiny", "--quick", "--threads", "1", "--feature-net", "none", "--methods", "fora",
          "--budgets", "0.3", "0.5", "--learn", "--out", str(out)])  # fmt: skip
    for budget in ("0.30", "0.50"):
        sched = Schedule.load(out / f"learned-{budget}" / "schedule.json")
        assert sched.meta["saved_macs"] >= float(budget)
    table = (out / "pareto.csv").read_text()
    assert table.count("learned,") == 2

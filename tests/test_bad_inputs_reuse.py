"""Files and settings made for another problem are refused, not silently reused: a stage-1 checkpoint of another
model or step count, a pruning plan of another model or step count; and settings that would learn or cache nothing
in disguise (no epochs, ToCa ratios outside [0, 1])."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from diffsparse.allocate.baselines import duca, toca
from diffsparse.learn.module import ScheduleLearner
from diffsparse.tasks.infer import infer
from diffsparse.tasks.learn import learn_schedule
from diffsparse.tasks.prune import prune

CONF = str(Path(__file__).resolve().parents[1] / "conf")
UNITS = ["transformer_blocks.0.attn1", "transformer_blocks.0.ff"]


def compose_cfg(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def _stage1_checkpoint(path: Path, **settings) -> Path:
    stage1 = ScheduleLearner(model="tiny", num_steps=8, **settings)
    torch.save({"state_dict": stage1.state_dict(), "hyper_parameters": dict(stage1.hparams)}, path)
    return path


def test_a_stage_one_checkpoint_of_another_problem_is_refused(tmp_path):
    ckpt = _stage1_checkpoint(tmp_path / "stage1.ckpt")
    ScheduleLearner(model="tiny", num_steps=8, stage=2, stage1_checkpoint=str(ckpt))  # the same problem: fine
    with pytest.raises(ValueError, match=r"another problem \(num_steps: 8 in stage 1, 6 now\)"):
        ScheduleLearner(model="tiny", num_steps=6, stage=2, stage1_checkpoint=str(ckpt))
    with pytest.raises(ValueError, match=r"model: 'tiny' in stage 1, 'dit_tiny' now"):
        ScheduleLearner(model="dit_tiny", num_steps=8, stage=2, stage1_checkpoint=str(ckpt))
    (tmp_path / "schedule.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a Lightning checkpoint"):
        ScheduleLearner(model="tiny", num_steps=8, stage=2, stage1_checkpoint=str(tmp_path / "schedule.json"))


def test_no_epochs_would_export_the_untrained_start(tmp_path):
    cfg = compose_cfg(
        "train", ["experiment=tiny_stage1", "trainer.max_epochs=0", "logger=csv", f"output_dir={tmp_path}"]
    )
    with pytest.raises(ValueError, match="trainer.max_epochs=0: nothing would be learned"):
        learn_schedule(cfg)
    assert not (tmp_path / "schedule.json").exists()


@pytest.mark.parametrize(("rule", "knobs", "message"), [
    (toca, {"fresh_ratio": 2.0}, "fresh_ratio must be in"), (toca, {"fresh_ratio": -1.0}, "fresh_ratio must be in"),
    (duca, {"interval": -2}, "interval must be >= 1"), (toca, {"ramp": 1.5}, "ramp must be in"),
])  # fmt: skip
def test_toca_settings_outside_their_range_are_refused(rule, knobs, message):
    with pytest.raises(ValueError, match=message):
        rule(UNITS, 8, **knobs)


def test_a_pruning_plan_runs_only_with_its_model_and_step_count(tmp_path):
    overrides = ["experiment=tiny_prune", "logger=csv", f"output_dir={tmp_path / 'p'}", "prune.schedule=uniform"]
    plan = prune(compose_cfg("train", overrides))["pruned"]
    common = [f"pruned={plan}", "rounds=1", f"output_dir={tmp_path / 'i'}"]
    with pytest.raises(ValueError, match="routes weights for 8 steps"):
        infer(compose_cfg("infer", ["model=tiny", "num_steps=3", *common]))
    with pytest.raises(ValueError, match="was made for the model"):
        infer(compose_cfg("infer", ["model=dit_tiny", *common]))
    assert not (tmp_path / "i").exists()

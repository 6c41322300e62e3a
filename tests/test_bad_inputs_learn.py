"""Settings a learn run cannot work with stop at once, with a ValueError that says what to set instead."""

import re

import lightning as L
import pytest
import torch

from diffsparse.learn.data import ConditionDataModule
from diffsparse.learn.module import ScheduleLearner


def learner(**kwargs) -> ScheduleLearner:
    return ScheduleLearner(**{"model": "tiny", "num_steps": 8, **kwargs})


def test_an_unreachable_budget_names_the_largest_one_in_fractions_of_the_macs():
    with pytest.raises(ValueError) as error:
        learner(budget=0.99)
    message = str(error.value)
    assert "learn.budget=0.99 cannot be met: with 8 steps and the first one always full" in message
    assert "at most 0.83 of the MACs can be saved; choose learn.budget <= 0.83 or more steps" in message
    schedule, _ = learner(budget=0.83).choice()  # the suggested budget is met
    assert learner(budget=0.83).table.saved_fraction(schedule) >= 0.83


@pytest.mark.parametrize("num_steps", [0, 1])
def test_fewer_than_two_steps_are_refused(num_steps):
    with pytest.raises(ValueError, match=rf"learn.num_steps={num_steps}: .*at least 2 steps.*learn.num_steps >= 2"):
        learner(num_steps=num_steps)


@pytest.mark.parametrize("budget", [0.0, 1.0, -0.2, 1.5])
def test_a_budget_outside_zero_one_is_refused(budget):
    with pytest.raises(ValueError, match=rf"learn.budget={re.escape(str(budget))}: .*strictly between 0 and 1"):
        learner(budget=budget)


@pytest.mark.parametrize("num_full", [0, 9])
def test_num_full_outside_one_to_num_steps_is_refused(num_full):
    with pytest.raises(ValueError, match=rf"learn.num_full={num_full}: .* in 1..learn.num_steps \(8\).*at least 1"):
        learner(num_full=num_full)


def test_num_full_none_lets_the_dp_choose_the_full_steps_and_a_number_is_kept():
    default = learner()
    assert default.num_full is None and default.full_steps() is None  # no fixed count: the DP's choice
    schedule, _ = default.choice()
    assert schedule.full_steps[0] == 0 and default.table.saved_fraction(schedule) >= 0.5
    fixed = learner(num_full=3)
    assert (
        fixed.num_full == 3
        and len(fixed.full_steps()) == 3
        and set(fixed.full_steps()) <= set(fixed.choice()[0].full_steps)
    )
    assert learner(num_full=1).num_full == 1
    assert learner(num_full=8).num_full == 8


@pytest.mark.parametrize("checkpoint", [None, "???"])
def test_stage_two_without_a_stage_one_checkpoint_says_how_to_get_one(checkpoint):
    with pytest.raises(ValueError, match=r"stage-1 checkpoint.*experiment=digits_stage1.*learn.stage1_checkpoint="):
        learner(stage=2, stage1_checkpoint=checkpoint)


def test_stage_two_with_a_missing_checkpoint_file_says_how_to_get_one(tmp_path):
    missing = tmp_path / "nowhere" / "stage1.ckpt"
    with pytest.raises(ValueError, match=rf"{re.escape(str(missing))} is not a file.*experiment=digits_stage1"):
        learner(stage=2, stage1_checkpoint=str(missing))


def test_stage_two_starts_from_a_stage_one_checkpoint(tmp_path):
    stage1 = learner()
    path = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": stage1.state_dict(), "hyper_parameters": dict(stage1.hparams)}, path)
    stage2 = learner(stage=2, stage1_checkpoint=str(path))
    assert stage2.stage1_full_steps == stage1.choice()[0].full_steps  # the DP chose them: those of its schedule
    fixed = learner(num_full=2)
    torch.save({"state_dict": fixed.state_dict(), "hyper_parameters": dict(fixed.hparams)}, path)
    assert learner(stage=2, stage1_checkpoint=str(path)).stage1_full_steps == fixed.full_steps()  # its step DP's


@pytest.mark.parametrize(
    ("setting", "value"), [("train_size", 0), ("val_size", 0), ("batch_size", 0), ("train_size", -1)]
)
def test_empty_data_is_refused(setting, value):
    with pytest.raises(ValueError, match=rf"data.{setting}={value}: .*data.{setting} >= 1"):
        ConditionDataModule(**{"train_size": 8, "val_size": 4, "batch_size": 4, setting: value})


def test_no_validation_data_says_validation_chooses_the_schedule():
    with pytest.raises(ValueError, match="validation chooses the exported schedule"):
        ConditionDataModule(train_size=8, val_size=0)


def test_resuming_another_problem_names_the_settings_that_differ():
    run = learner()
    same = {"hyper_parameters": {**run.hparams, "lr": 0.3, "temperature": 1.0}}  # not part of the problem
    run.on_load_checkpoint(same)
    other = {"hyper_parameters": {**run.hparams, "budget": 0.3, "selector": "norm"}}
    with pytest.raises(ValueError) as error:
        run.on_load_checkpoint(other)
    message = str(error.value)
    assert "learn.budget: 0.3 in the checkpoint, 0.5 now" in message
    assert "learn.selector: 'norm' in the checkpoint, 'toca' now" in message
    assert "resume with the same settings, or start a new run without ckpt_path" in message.lower()


def test_fit_from_a_checkpoint_of_another_step_count_stops_before_loading_its_costs(tmp_path):
    """Through Lightning: the hyper-parameters are compared before the (differently shaped) costs are loaded."""
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    data = ConditionDataModule(train_size=1, val_size=1, batch_size=1)
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, num_sanity_val_steps=0, **quiet)
    trainer.fit(learner(num_steps=4), data)
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    resumed = L.Trainer(max_steps=2, limit_val_batches=0, num_sanity_val_steps=0, **quiet)
    with pytest.raises(ValueError, match=r"learn.num_steps: 4 in the checkpoint, 8 now"):
        resumed.fit(learner(num_steps=8), data, ckpt_path=path)

"""Refining a schedule by neighbouring-step swaps: the moves, the greedy search, and the learner's use of it."""

from functools import partial

import numpy as np
import pytest
import torch

from diffsparse.allocate.baselines import forecast_fora
from diffsparse.learn.refine import first_conditions, refine_by_swaps, swap_moves


def full_steps(actions: np.ndarray) -> list[int]:
    return [int(t) for t in np.flatnonzero((actions == 0).all(axis=1))]


def test_moves_are_the_neighbouring_steps_that_differ_and_never_step_0():
    actions = forecast_fora(["a", "b"], 8, interval=3).action_indices()  # full at 0, 3, 6
    assert swap_moves(actions) == [2, 3, 5, 6]
    assert swap_moves(np.zeros((5, 2), dtype=int)) == []


def test_swaps_move_full_steps_towards_a_better_score_and_keep_the_macs():
    actions = forecast_fora(["a", "b", "c"], 12, interval=2).action_indices()  # full at 0, 2, 4, 6, 8, 10
    target = [0, 3, 5, 6, 8, 11]  # a score that prefers these full steps

    def score(a):
        return float(sum(abs(x - y) for x, y in zip(full_steps(a), target, strict=True)))

    refined, report = refine_by_swaps(actions, score, passes=3, progress=False)
    assert full_steps(refined) == target and report["score_after"] == 0.0 < report["score_before"]
    # a swap permutes steps: the same rows (so the same MACs), and step 0 untouched
    assert sorted(map(tuple, refined)) == sorted(map(tuple, actions)) and (refined[0] == actions[0]).all()
    assert all(b == a + 1 for a, b in report["moves"]) and report["rollouts"] > len(report["moves"])


def test_nothing_is_kept_unless_the_score_falls_by_min_gain():
    actions = forecast_fora(["a"], 10, interval=2).action_indices()
    values = iter([1.0] + [0.995] * 100)  # every candidate 0.5 % better: below the 1 % needed
    refined, report = refine_by_swaps(actions, lambda a: next(values), min_gain=0.01, progress=False)
    assert (refined == actions).all() and report["moves"] == [] and report["score_after"] == 1.0
    with pytest.raises(ValueError, match="min_gain"):
        refine_by_swaps(actions, lambda a: 0.0, min_gain=1.0)


def test_the_learner_keeps_a_refinement_only_if_it_validates_better():
    from diffsparse.learn.data import ConditionDataModule
    from diffsparse.learn.module import ScheduleLearner
    from diffsparse.learn.refine import refine_schedule

    learner = ScheduleLearner(model="tiny", num_steps=8, budget=0.5, forecast=True, starts=["forecast_fora"],
                              loss="l2")  # fmt: skip
    data = ConditionDataModule(num_classes=learner.num_classes, train_size=8, val_size=4, batch_size=2)
    data.setup("fit")
    learner.setup("fit")
    start, val = learner.starts["forecast_fora"], data.val_dataloader()
    refine = partial(refine_schedule, learner.validation_l2, passes=2, size=5, progress=False)
    refined, report = refine(start, data.train_dataloader(), val)
    assert report["conditions"] == 5 and report["val_l2_before"] == learner.validation_l2(start, val)
    assert sorted(map(tuple, refined.action_indices())) == sorted(map(tuple, start.action_indices()))
    if report["kept"]:  # kept: validates better, and is what the report says
        assert report["val_l2_after"] < report["val_l2_before"]
        assert refined.meta["refined_swaps"] == len(report["moves"])
        assert learner.validation_l2(refined, val) == pytest.approx(report["val_l2_after"])
    else:
        assert refined is start
    # told its validation L2 is 0, nothing can validate better: the schedule comes back as it was
    same, report = refine(start, data.train_dataloader(), val, val_l2=0.0)
    assert same is start and not report["kept"]


def test_the_first_conditions_are_taken_in_order_and_rebatched():
    batches = [{"seed": torch.arange(i, i + 3), "class_labels": torch.arange(i, i + 3) % 2} for i in (0, 3, 6)]
    out = first_conditions(batches, size=7, batch_size=4)
    assert [b["seed"].tolist() for b in out] == [[0, 1, 2, 3], [4, 5, 6]]
    with pytest.raises(ValueError, match="training conditions"):
        first_conditions([], size=4)

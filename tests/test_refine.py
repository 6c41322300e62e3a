"""Refining a schedule by moving steps' actions (swaps, shifts): the moves, the greedy search, and the learner's use
of it."""

import json
from functools import partial

import numpy as np
import pytest
import torch

from diffsparse.allocate.baselines import forecast_fora
from diffsparse.learn.moves import shifted, swap_moves
from diffsparse.learn.refine import first_conditions, refine_by_moves, refine_schedule
from diffsparse.schedule import Schedule

UNITS = ["a", "b", "c"]


def full_steps(actions: np.ndarray) -> list[int]:
    return [int(t) for t in np.flatnonzero((actions == 0).all(axis=1))]


def distance_to(target):
    """A score that prefers the full steps `target` (exact: it ignores the limit)."""
    return lambda a, limit=None: float(sum(abs(x - y) for x, y in zip(full_steps(a), target, strict=True)))


def test_moves_are_the_neighbouring_steps_that_differ_and_never_step_0():
    actions = forecast_fora(["a", "b"], 8, interval=3).action_indices()  # full at 0, 3, 6
    assert swap_moves(actions) == [2, 3, 5, 6]
    assert swap_moves(np.zeros((5, 2), dtype=int)) == []


def test_swaps_move_full_steps_towards_a_better_score_and_keep_the_rows():
    actions = forecast_fora(UNITS, 12, interval=2).action_indices()  # full at 0, 2, 4, 6, 8, 10
    target = [0, 3, 5, 6, 8, 11]
    refined, report = refine_by_moves(actions, distance_to(target), passes=3, progress=False)
    assert full_steps(refined) == target and report["score_after"] == 0.0 < report["score_before"]
    # a swap permutes steps: the same rows, and step 0 untouched
    assert sorted(map(tuple, refined)) == sorted(map(tuple, actions)) and (refined[0] == actions[0]).all()
    assert report["moves"] == [(2, 3), (4, 5), (10, 11)]
    # the start, then pass 1: 10 candidates, of which (3, 4) and (5, 6) were made no-ops by the swap kept just
    # before them and are skipped; pass 2: the 7 pairs that differ, none better, which ends the search; one of
    # them undoes the swap (10, 11), which gives a schedule scored before, and is not scored again
    assert report["rollouts"] == 1 + 8 + 6


def test_a_target_two_steps_away_needs_a_second_pass():
    actions = forecast_fora(UNITS, 8, interval=4).action_indices()  # full at 0, 4
    refined, report = refine_by_moves(actions, distance_to([0, 2]), passes=1, progress=False)
    assert full_steps(refined) == [0, 3]  # one pass moves a full step by one
    refined, report = refine_by_moves(actions, distance_to([0, 2]), passes=3, progress=False)
    assert full_steps(refined) == [0, 2] and report["moves"] == [(3, 4), (2, 3)]


def test_a_shift_moves_every_later_full_step_by_one_and_keeps_the_rows():
    actions = forecast_fora(UNITS, 10, interval=2).action_indices()  # full at 0, 2, 4, 6, 8
    found = dict(shifted(actions, 3))
    assert full_steps(found[(3, "later")]) == [0, 2, 5, 7, 9]
    assert full_steps(found[(3, "earlier")]) == [0, 2, 3, 5, 7]
    for candidate in found.values():  # a permutation of the steps after step 0
        assert sorted(map(tuple, candidate)) == sorted(map(tuple, actions)) and (candidate[0] == actions[0]).all()
    # a shift that changes nothing is not offered: the steps from 3 on all act alike here
    assert shifted(np.concatenate([actions[:3], np.ones((7, 3), dtype=int)]), 3) == []


def test_a_shift_reaches_in_one_move_what_swaps_reach_in_many():
    actions = forecast_fora(UNITS, 12, interval=2).action_indices()  # full at 0, 2, 4, 6, 8, 10
    target = [0, 2, 5, 7, 9, 11]
    # the shift of the steps from 1 on also gains ([0, 3, 5, ...]), but the best shift is kept, not the first
    moved, report = refine_by_moves(actions, distance_to(target), passes=3, progress=False, moves=("shift",))
    assert full_steps(moved) == target and report["moves"] == [(3, "later")]
    # the start, the 10 distinct shifts of pass 1 (a shift from an even step gives what one from the odd step before
    # gives), then pass 2's 10 shifts of the target, one of which is the start, scored before, none better: the search
    # ends, and a schedule is scored once
    assert report["rollouts"] == 1 + 10 + 10
    swapped, report = refine_by_moves(actions, distance_to(target), passes=3, progress=False)
    assert full_steps(swapped) == target and len(report["moves"]) == 4


def test_shifts_are_screened_and_only_the_finalists_scored():
    actions = forecast_fora(UNITS, 12, interval=2).action_indices()  # full at 0, 2, 4, 6, 8, 10
    target = [0, 2, 5, 7, 9, 11]
    score = distance_to(target)
    # an exact screen: the best shift is among the finalists, so the same move is kept, from fewer full scores
    moved, report = refine_by_moves(actions, score, passes=1, progress=False, moves=("shift",), screen=score,
                                    finalists=2)  # fmt: skip
    assert full_steps(moved) == target and report["moves"] == [(3, "later")]
    assert report["screened"] == 10 and report["rollouts"] == 1 + 2
    # a screen that prefers other shifts: the best one is never scored, and the screen's favourite is kept
    misled = distance_to([0, 3, 5, 7, 9, 11])  # the shift of the steps from 1 on
    moved, report = refine_by_moves(actions, score, passes=1, progress=False, moves=("shift",), screen=misled,
                                    finalists=1)  # fmt: skip
    assert report["moves"] == [(1, "later")] and full_steps(moved) == [0, 3, 5, 7, 9, 11]


def test_a_shift_is_kept_only_if_it_validates_better_and_the_swaps_go_on():
    start = forecast_fora(UNITS, 8, interval=2).with_forecast(True)  # full at 0, 2, 4, 6
    shift = [0, 3, 5, 7]  # one shift of the steps from 1 on, or four swaps
    refine = partial(refine_schedule, passes=1, size=4, batch=2, progress=False, moves=("swap", "shift"))
    kept, report = refine(stub_score(shift, shift), start, batches(0, 8), batches(100, 4))
    assert report["moves"] == [(1, "later")] and report["rejected"] == [] and report["screened"] > 0
    assert full_steps(kept.action_indices()) == shift and report["kept"]
    # training wants the shift, validation does not: the shift is not kept, and the swaps are still tried
    same, report = refine(stub_score(shift, [0, 2, 4, 6]), start, batches(0, 8), batches(100, 4))
    assert report["rejected"] == [(1, "later")] and report["moves"][0] == (2, 3) and not report["kept"]
    assert same is start and report["val_before"] == 0.0


def test_nothing_is_kept_unless_the_score_falls_by_min_gain():
    actions = forecast_fora(["a"], 10, interval=2).action_indices()
    values = iter([1.0] + [0.995] * 100)  # every candidate 0.5 % better: below the 1 % needed
    refined, report = refine_by_moves(actions, lambda a, limit: next(values), min_gain=0.01, progress=False)
    assert (refined == actions).all() and report["moves"] == [] and report["score_after"] == 1.0
    with pytest.raises(ValueError, match="min_gain"):
        refine_by_moves(actions, lambda a, limit: 0.0, min_gain=1.0)


def stub_score(train_target, val_target):
    """A `validation_score` that scores full steps against one target on training batches (seeds < 100) and another
    on validation batches (seeds >= 100)."""

    def validation_score(schedule: Schedule, batches) -> float:
        target = val_target if int(batches[0]["seed"][0]) >= 100 else train_target
        return distance_to(target)(schedule.action_indices())

    return validation_score


def batches(first: int, size: int, batch: int = 2) -> list[dict]:
    return [{"class_labels": torch.arange(i, i + batch) % 3, "seed": torch.arange(i, i + batch)}
            for i in range(first, first + size, batch)]  # fmt: skip


def test_a_refinement_is_kept_only_if_it_validates_better():
    start = forecast_fora(UNITS, 8, interval=2).with_forecast(True, {"method": "forecast_fora"})  # full 0, 2, 4, 6
    better = [0, 3, 5, 7]
    refine = partial(refine_schedule, passes=2, size=4, batch=3, progress=False)
    refined, report = refine(stub_score(better, better), start, batches(0, 8), batches(100, 4))
    assert report["kept"] and full_steps(refined.action_indices()) == better and report["conditions"] == 4
    assert report["val_after"] == 0.0 < report["val_before"] and refined.meta["refined_moves"] == 3
    assert refined.meta["method"] == "forecast_fora"
    # better on the training conditions, worse on validation: the start comes back
    same, report = refine(stub_score(better, [0, 2, 4, 6]), start, batches(0, 8), batches(100, 4))
    assert same is start and report["moves"] and not report["kept"]
    # nothing better on training: no validation needed, nothing kept
    same, report = refine(stub_score([0, 2, 4, 6], better), start, batches(0, 8), batches(100, 4))
    assert same is start and report["moves"] == [] and report["val_before"] is None


def test_the_refined_schedule_saves_exactly_the_macs_of_its_start():
    from diffsparse.models.loading import load_model

    table = load_model("tiny").mac_table()
    start = forecast_fora(list(table.units), 8, interval=2)
    refined, report = refine_schedule(stub_score([0, 3, 5, 7], [0, 3, 5, 7]), start, batches(0, 4), batches(100, 2),
                                      size=4, progress=False)  # fmt: skip
    assert report["kept"] and refined != start
    assert table.saved_fraction(refined) == table.saved_fraction(start)


def test_the_first_conditions_are_taken_in_order_and_rebatched():
    given = [{"seed": torch.arange(i, i + 3), "emb": torch.ones(3, 2, 4) * i} for i in (0, 3, 6)]
    out = first_conditions(given, size=7, batch_size=4)
    assert [b["seed"].tolist() for b in out] == [[0, 1, 2, 3], [4, 5, 6]] and out[1]["emb"].shape == (3, 2, 4)
    assert [b["seed"].tolist() for b in first_conditions(given, size=6, batch_size=3)] == [[0, 1, 2], [3, 4, 5]]
    assert sum(len(b["seed"]) for b in first_conditions(given, size=50, batch_size=32)) == 9  # all there are
    with pytest.raises(ValueError, match="training conditions"):
        first_conditions([], size=4, batch_size=2)


def test_refinement_settings_that_cannot_work_are_refused_before_learning():
    from diffsparse.learn.module import ScheduleLearner

    for bad in ({"refine_passes": -1}, {"refine_size": 0}, {"refine_batch": 0}):
        with pytest.raises(ValueError, match="learn.refine_passes"):
            ScheduleLearner(model="tiny", num_steps=8, **bad)
    for bad in (["jump"], []):
        with pytest.raises(ValueError, match="learn.refine_moves"):
            ScheduleLearner(model="tiny", num_steps=8, refine_moves=bad)
    with pytest.raises(ValueError, match="learn.judge='psnr'"):
        ScheduleLearner(model="tiny", num_steps=8, judge="psnr")


def test_a_clearly_worse_candidate_stops_its_rollouts_early_and_nothing_else_changes():
    start = forecast_fora(UNITS, 8, interval=2).with_forecast(True, {"method": "forecast_fora"})  # full 0, 2, 4, 6
    calls = []

    def validation_score(schedule, parts):  # the start 1 on every condition, every swap 10: each is stopped early
        calls.append(len(parts[0]["seed"]))
        return 1.0 if schedule.full_steps == [0, 2, 4, 6] else 10.0

    same, report = refine_schedule(validation_score, start, batches(0, 8), batches(100, 4), size=8, batch=2,
                                   progress=False, screen=False)  # fmt: skip
    assert same is start and report["moves"] == []
    candidates = report["rollouts"] - 1
    # the start on all 8 conditions; each candidate stops after its first batch of 2 (10 x 2 / 8 >= 0.99)
    assert candidates == 6 and report["rolled_out"] == 8 + 2 * candidates == sum(calls)
    # screened (the default), the same first batches, and no candidate is scored: none screens better
    calls.clear()
    same, report = refine_schedule(validation_score, start, batches(0, 8), batches(100, 4), size=8, batch=2,
                                   progress=False)  # fmt: skip
    assert same is start and report["rollouts"] == 1 and report["screened"] == 6
    assert report["rolled_out"] == 8 + 2 * 6 == sum(calls)


def test_a_swap_that_screens_worse_on_the_first_batch_is_not_scored_on_the_rest():
    start = forecast_fora(UNITS, 8, interval=4).with_forecast(True)  # full at 0, 4: swaps at 3 and 4
    moved_to_3 = [0, 3]

    def validation_score(schedule, parts):  # moving the full step to 3 helps everywhere but on seeds 0, 1
        worse_here = int(parts[0]["seed"][0]) == 0
        return 1.0 if schedule.full_steps != moved_to_3 else 2.0 if worse_here else 0.1

    refine = partial(refine_schedule, validation_score, start, batches(0, 8), batches(100, 4), size=8, batch=2,
                     passes=1, progress=False)  # fmt: skip
    kept, report = refine(screen=False)
    assert full_steps(kept.action_indices()) == moved_to_3 and report["screened"] == 0
    same, report = refine()
    assert same is start and report["moves"] == [] and report["screened"] == 2 and report["rollouts"] == 1


def test_negative_scores_stop_early_only_once_the_floor_proves_a_candidate_worse():
    """Log L2 scores are negative: a candidate is stopped when even the least score (`floor`) on every condition
    left could not bring its mean below the current one's."""
    start = forecast_fora(UNITS, 8, interval=2).with_forecast(True, {"method": "forecast_fora"})  # full 0, 2, 4, 6
    calls = []

    def scorer(swapped: float):  # the start -50 dB on every condition, every swap `swapped`
        def validation_score(schedule, parts):
            calls.append(len(parts[0]["seed"]))
            return -50.0 if schedule.full_steps == [0, 2, 4, 6] else swapped

        return validation_score

    for swapped, rolled in ((-40.0, 8), (300.0, 2)):  # -40 may still end below -50; 300 cannot after 2 of 8
        calls.clear()
        same, report = refine_schedule(scorer(swapped), start, batches(0, 8), batches(100, 4), size=8, batch=2,
                                       progress=False, parts=("log_l2",), screen=False)  # fmt: skip
        assert same is start and report["moves"] == []
        assert report["rolled_out"] == 8 + rolled * (report["rollouts"] - 1) == sum(calls)


def test_judged_by_both_a_swap_is_kept_only_if_it_lowers_both_scores():
    """Two parts (mean L2, mean log L2): moving the full step to 3 lowers both, to 2 only the log L2; the swaps
    stop at 3, and a pass is kept only if it validates better under both."""
    start = forecast_fora(UNITS, 8, interval=4).with_forecast(True)  # full at 0, 4
    table = {
        (0, 4): [2.0, -40.0],
        (0, 3): [1.0, -41.0],
        (0, 2): [1.5, -50.0],
        (0, 5): [3.0, -39.0],
        (0, 1): [9.0, -30.0],
    }

    def validation_scores(schedule, parts):
        return np.array(table[tuple(schedule.full_steps)])

    refined, report = refine_schedule(validation_scores, start, batches(0, 4), batches(100, 2), passes=3, size=4,
                                      progress=False, parts=("l2", "log_l2"))  # fmt: skip
    assert report["kept"] and refined.full_steps == [0, 3] and report["moves"] == [(3, 4)]
    assert report["val_before"] == [2.0, -40.0] and report["val_after"] == [1.0, -41.0]
    assert report["score_after"] == pytest.approx([1.0, -41.0]) and report["parts"] == ["l2", "log_l2"]
    # judged by the log L2 alone, the full step goes on to 2
    refined, _ = refine_schedule(lambda s, p: table[tuple(s.full_steps)][1], start, batches(0, 4), batches(100, 2),
                                 passes=3, size=4, progress=False, parts=("log_l2",))  # fmt: skip
    assert refined.full_steps == [0, 2]


def test_the_judges_score_each_sample():
    from diffsparse.learn.losses import sample_errors

    student, teacher = torch.zeros(3, 1, 4, 4), torch.zeros(3, 1, 4, 4)
    student[0] += 0.1
    student[1] += 0.01
    l2 = sample_errors(student, teacher, "l2")
    assert l2.mean() == pytest.approx(float(torch.nn.functional.mse_loss(student, teacher)))
    log = sample_errors(student, teacher, "log_l2")
    assert log[:2].tolist() == pytest.approx([-20.0, -40.0], abs=1e-4) and log[2] == pytest.approx(-120.0)
    with pytest.raises(ValueError, match="judge 'psnr'"):
        sample_errors(student, teacher, "psnr")


def test_a_failed_refinement_leaves_the_learned_schedule_exported(tmp_path, monkeypatch):
    import diffsparse.learn.export as export
    from diffsparse.learn.recipe import learn_recipe

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(export, "refine_schedule", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        learn_recipe("tiny", 0.5, tmp_path, num_steps=8, max_epochs=1)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert Schedule.load(tmp_path / "schedule.json").meta["saved_macs"] >= 0.5 and "refine" not in metrics


@pytest.mark.parametrize("moves", [("swap",), ("swap", "shift")])
def test_paused_rollouts_give_the_scores_of_whole_ones_in_fewer_steps(moves):
    """The learner's scores from rollouts paused before the moved step equal whole rollouts' (the cache state
    restored from a copy), over two passes with kept moves, on a forecasting and partial-token start."""
    from diffsparse.learn.data import ConditionDataModule
    from diffsparse.learn.module import ScheduleLearner

    learner = ScheduleLearner(model="tiny", num_steps=8, budget=0.5, forecast=True, starts=["toca"])
    learner.setup("fit")
    data = ConditionDataModule(num_classes=learner.num_classes, train_size=6, val_size=4, batch_size=3)
    data.setup("fit")
    start = learner.starts["toca"]
    assert any(0 < s < 1 for row in start.grid for s in row)  # partial steps: the selector and gathers run too
    run = partial(refine_schedule, learner.validation_scores, start, passes=2, size=6, batch=3, progress=False,
                  moves=moves)  # fmt: skip
    whole, report = run(data.train_dataloader(), data.val_dataloader())
    paused, fast = run(data.train_dataloader(), data.val_dataloader(), rollouts=learner)
    assert report["moves"] and fast["moves"] == report["moves"] and fast["rolled_out"] == report["rolled_out"]
    assert fast["score_before"] == pytest.approx(report["score_before"], rel=1e-6)
    assert fast["score_after"] == pytest.approx(report["score_after"], rel=1e-6)
    assert report["score_after"] < report["score_before"]
    assert (paused.action_indices() == whole.action_indices()).all()
    whole_steps = report["rolled_out"] // 3 * 8  # every scored batch of 3 ran all 8 steps
    assert fast["steps_run"] < 0.8 * whole_steps, (fast["steps_run"], whole_steps)


def test_of_the_passes_the_one_that_validates_best_is_kept():
    start = forecast_fora(UNITS, 8, interval=4).with_forecast(True)  # full at 0, 4
    # training pulls the full step to 2 (two passes), validation prefers 3 (the first pass's result)
    refined, report = refine_schedule(stub_score([0, 2], [0, 3]), start, batches(0, 4), batches(100, 2), passes=3,
                                      size=4, progress=False)  # fmt: skip
    assert [p["val"] for p in report["passes"]] == [0.0, 1.0] and report["val_before"] == 1.0
    assert report["kept"] and full_steps(refined.action_indices()) == [0, 3] and report["moves"] == [(3, 4)]
    assert refined.meta["refined_moves"] == 1 and report["val_after"] == 0.0

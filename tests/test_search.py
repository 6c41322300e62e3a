"""Searched stage-wise schedules: the space, the budget every candidate keeps, reproducibility, resuming, and each
search for two generations on a tiny model through the Hydra entry point."""

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hypothesis import given, settings
from hypothesis import strategies as st

from diffsparse import Schedule
from diffsparse.allocate.search import ALGORITHMS, make_search
from diffsparse.allocate.stages import StageSpace
from diffsparse.tasks.search import search_schedule

CONF = str(Path(__file__).resolve().parents[1] / "conf")
UNITS = tuple(f"transformer_blocks.{b}.{k}" for b in range(4) for k in ("attn1", "ff"))


def toy_fitness(x: np.ndarray) -> float:
    """A fitness with a known best: low levels early, high levels late."""
    weights = np.linspace(-1.0, 1.0, x.shape[0])[:, None]
    return float((weights * x).sum())


def test_expanding_a_stage_level_gives_its_mean_sparsity_and_keeps_step_0_full():
    space = StageSpace(UNITS, num_steps=20, num_stages=4, levels=16, grouping="kind")
    x = np.array([[12, 4], [8, 16], [0, 10], [6, 1]])
    grid = space.expand(x).grid
    assert (grid[0] == 0).all()
    stage = space.stage_of_step()
    for k in range(4):
        for g, kind in enumerate(("attn1", "ff")):
            cols = [i for i, u in enumerate(UNITS) if u.endswith(kind)]
            mean = grid[stage == k][:, cols].mean()
            assert abs(mean - x[k, g] / 16) <= 0.25 / 5 + 1e-9  # one step's rounding of the level grid
    assert space.upper()[0].tolist() == [12, 12]  # stage 0 has 5 steps, one of them always full


def test_bad_spaces_and_individuals_are_refused():
    with pytest.raises(ValueError, match="dividers"):
        StageSpace(UNITS, 20, 3, dividers=(10, 5))
    with pytest.raises(ValueError, match="grouping"):
        StageSpace(UNITS, 20, 3, grouping="rows")
    space = StageSpace(UNITS, 20, 4, levels=8)
    with pytest.raises(ValueError, match="level sum"):
        space.check(np.array([[1], [2], [3], [4]]), total=11)
    with pytest.raises(ValueError, match="not in"):
        space.check(np.array([[8], [0], [0], [0]]))  # stage 0 tops out below 8


@settings(max_examples=40, deadline=None)
@given(
    steps=st.integers(4, 30),
    stages=st.integers(1, 6),
    levels=st.integers(1, 16),
    grouping=st.sampled_from(["all", "kind", "half"]),
    fraction=st.floats(0.0, 1.0),
    algorithm=st.sampled_from(ALGORITHMS),
    seed=st.integers(0, 10),
)
def test_every_candidate_a_search_evaluates_meets_the_budget_exactly(
    steps, stages, levels, grouping, fraction, algorithm, seed
):
    space = StageSpace(UNITS, steps, min(stages, steps), levels, grouping)
    total = int(round(fraction * space.max_sum()))
    seen = []

    def fitness(x):
        seen.append(np.array(x))
        return toy_fitness(x)

    search = make_search(algorithm, space, total, fitness, seed=seed, population=6, survivors=2, offspring=4)
    for _ in range(3):
        search.step()
    assert seen
    for x in seen:
        assert x.shape == space.shape and int(x.sum()) == total
        assert (x >= 0).all() and (x <= space.upper()).all()
        space.expand(x)  # a valid Schedule


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_search_is_reproducible_and_resumes_where_it_stopped(algorithm):
    space = StageSpace(UNITS, 20, 5, levels=8)
    total = space.max_sum() // 2

    def run(generations, state=None, seed=0):
        search = make_search(algorithm, space, total, toy_fitness, seed=seed, population=6, survivors=2, offspring=4)
        if state is not None:
            search.load_state_dict(state)
        while search.generation < generations and not search.done:
            search.step()
        return search

    straight = run(4)
    assert straight.evaluated == run(4).evaluated
    resumed = run(4, state=run(2).state_dict())
    assert resumed.evaluated == straight.evaluated and resumed.generation == straight.generation
    assert straight.best[1] > toy_fitness(space.even(total))  # it found better than the even spread
    if algorithm in ("evolution", "random", "genetic"):
        assert run(4, seed=1).evaluated != straight.evaluated


def test_a_saved_state_of_another_search_is_refused():
    space = StageSpace(UNITS, 20, 5, levels=8)
    state = make_search("random", space, 10, toy_fitness).state_dict()
    with pytest.raises(ValueError, match="same algorithm"):
        make_search("evolution", space, 10, toy_fitness).load_state_dict(state)


def compose_search(algorithm: str, out: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        args = ["experiment=tiny_search", f"search.algorithm={algorithm}", "logger=csv", f"output_dir={out}"]
        return compose(config_name="train", overrides=[*args, *overrides])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_search_runs_two_generations_on_a_tiny_model_and_exports(algorithm, tmp_path):
    result = search_schedule(compose_search(algorithm, tmp_path))
    schedule = Schedule.load(tmp_path / "schedule.json")
    assert result["generations"] == 2 and result["evaluated"] >= 2
    assert schedule.meta["algorithm"] == algorithm and schedule.meta["saved_macs"] > 0.3
    assert np.asarray(result["levels"]).sum() == result["level_sum"]
    assert (tmp_path / "schedule.png").is_file() and (tmp_path / "search.png").is_file()
    assert (tmp_path / "search_state.json").is_file()
    if algorithm == "evolution":  # a rerun into the same folder continues from the saved state
        more = search_schedule(compose_search(algorithm, tmp_path, "search.generations=3"))
        assert more["generations"] == 3 and more["evaluated"] > result["evaluated"]
        assert more["fitness"] >= result["fitness"]


def test_fitness_is_best_for_the_dense_schedule_on_every_metric(tmp_path, monkeypatch):
    from diffsparse.allocate.fitness import METRICS, SampleFitness
    from diffsparse.learn.losses import LpipsWeightsMissing
    from diffsparse.models.loading import load_model

    ref = load_model("tiny")
    units = [u for u in UNITS if int(u.split(".")[1]) < 2]
    dense, sparse = Schedule.uniform(units, 6, 0.0), Schedule.uniform(units, 6, 0.75)
    for metric in METRICS:
        if metric == "lpips":
            monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path))
            with pytest.raises(LpipsWeightsMissing, match="loss=l2"):
                SampleFitness(ref, 6, metric, samples=10)
            continue
        with SampleFitness(ref, 6, metric, samples=10) as fitness:
            at_dense, at_sparse = fitness(dense), fitness(sparse)
        if metric == "accuracy":  # a random model's digits: only the same images are sure to score the same
            assert 0.0 <= at_sparse <= 1.0
        else:
            assert at_dense > at_sparse, metric
        assert {"ssim": 1.0, "psnr": 100.0, "l2": 0.0}.get(metric, at_dense) == pytest.approx(at_dense)

"""The allocator registry: one registered function reaches the budget fit, the evaluation's methods, the bench's
names and Hydra; unit kinds and blocks come from the backbone registry (FLUX included)."""

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from diffsparse.accounting.macs import mac_table
from diffsparse.allocate import baselines
from diffsparse.allocate.registry import ALLOCATORS, make_schedule, named_schedule, register_allocator
from diffsparse.allocate.stages import StageSpace, unit_groups
from diffsparse.allocate.units import unit_kinds, unit_places
from diffsparse.backbones import BACKBONES, build_transformer, cacheable_units, example_inputs, find_units
from diffsparse.backbones.registry import JOINT_ATTN, MLP, PARALLEL_BLOCK
from diffsparse.evaluate.bench import check_schedule_name
from diffsparse.evaluate.builders import BUILDERS
from diffsparse.evaluate.cli import ALL_METHODS
from diffsparse.evaluate.methods import SCHEDULE_METHODS
from diffsparse.schedule import Schedule

CONF = Path(__file__).resolve().parents[1] / "conf" / "allocator"
UNITS = [f"transformer_blocks.{i}.{leaf}" for i in range(2) for leaf in ("attn1", "ff")]


@pytest.fixture(scope="module")
def table():
    model = build_transformer("dit", "tiny")
    return mac_table(model, **example_inputs(model, batch=2))


def test_every_registered_allocator_is_a_method_of_the_evaluation():
    assert list(ALLOCATORS) == ["fora", "forecast_fora", "forecast_warmup", "toca", "duca", "uniform", "snr_stages"]
    assert SCHEDULE_METHODS == {spec.method: name for name, spec in ALLOCATORS.items()}
    assert set(SCHEDULE_METHODS) <= set(ALL_METHODS) and tuple(BUILDERS) == ALL_METHODS
    assert ALLOCATORS["duca"].selector == "norm" and ALLOCATORS["snr_stages"].method == "snr-stages"


def test_hydra_allocator_configs_name_registered_allocators():
    for path in sorted(CONF.glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path))
        assert node["_target_"] == "diffsparse.allocate.registry.make_schedule" and node["name"] == path.stem
        knobs = {k: v for k, v in node.items() if not k.startswith("_") and k != "name"}
        sched = make_schedule(node["name"], UNITS, 6, **knobs)
        assert sched.num_steps == 6 and sched.meta["method"] == path.stem


def test_a_new_registered_rule_is_fitted_and_named_with_the_others(table):
    @register_allocator("every_other", fit=lambda n: [{"sparsity": s} for s in (0.25, 0.5, 0.75, 1.0)],
                        presets={"every-other-half": {"sparsity": 0.5}})  # fmt: skip
    def every_other(units, num_steps, sparsity=0.5):
        grid = np.zeros((num_steps, len(units)))
        grid[1::2] = sparsity
        return Schedule(grid, units, {"method": "every_other", "sparsity": sparsity})

    try:
        fitted = baselines.budget_schedules(table, list(range(999, 0, -50)), 0.3)
        assert set(fitted) == {
            "fora",
            "forecast_fora",
            "forecast_warmup",
            "toca",
            "duca",
            "uniform",
            "snr_stages",
            "every_other",
        }
        gaps = {s: abs(table.saved_fraction(every_other(table.units, 20, s)) - 0.3) for s in (0.25, 0.5, 0.75, 1.0)}
        assert fitted["every_other"].meta["sparsity"] == min(gaps, key=gaps.get)
        assert named_schedule("every-other-half", UNITS, 4).grid[1].tolist() == [0.5] * 4
        check_schedule_name("every-other-half")
        with pytest.raises(ValueError, match="registered already"):
            register_allocator("every_other", fit=lambda n: [])(every_other)
    finally:
        del ALLOCATORS["every_other"]


def test_bench_names_come_from_the_registry():
    toca_like = named_schedule("toca-like", UNITS, 12)
    assert np.array_equal(toca_like.grid, baselines.toca(UNITS, 12, fresh_ratio=0.25, interval=3, ramp=0.0).grid)
    assert np.array_equal(named_schedule("uniform-0.6", UNITS, 9).grid, baselines.uniform(UNITS, 9, 0.6).grid)
    with pytest.raises(ValueError, match=r"uniform-<sparsity> needs a sparsity from 0 to 1, e\.g\. uniform-0\.5\."):
        named_schedule("uniform-2", UNITS, 4)
    with pytest.raises(ValueError, match=r"Unknown schedule 'fora': use uniform-<sparsity> \(e\.g\. uniform-0\.5\)"):
        named_schedule("fora", UNITS, 4)


def test_timestep_rules_ask_for_the_timesteps():
    with pytest.raises(ValueError, match="pass timesteps=scheduler.timesteps"):
        make_schedule("snr_stages", UNITS, 8)
    assert make_schedule("snr_stages", UNITS, timesteps=[980, 600, 300, 50]).num_steps == 4


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_unit_kinds_and_blocks_are_the_registry_s(backbone):
    model = build_transformer(backbone, "tiny")
    places = unit_places(cacheable_units(model))
    assert [(p.kind, p.block) for p in places] == [(u.kind, u.block) for u in find_units(model)]


def test_flux_joint_attention_keeps_toca_s_attention_weight_and_groups_by_kind():
    units = cacheable_units(build_transformer("flux", "tiny"))
    kinds = unit_kinds(units)
    assert JOINT_ATTN in kinds and PARALLEL_BLOCK in kinds
    flat = baselines.toca(units, 12, fresh_ratio=0.25, interval=3, ramp=0.0).grid[1]
    for kind, sparsity in ((JOINT_ATTN, 0.5), (MLP, 0.75), (PARALLEL_BLOCK, 0.75)):
        assert {s for s, k in zip(flat, kinds, strict=True) if k == kind} == {sparsity}, kind
    names, group = unit_groups(units, "kind")
    assert names == list(dict.fromkeys(kinds)) and len(set(group)) == 3
    assert StageSpace(tuple(units), 10, 2, grouping="kind").shape == (2, 3)
    blocks = [u.block for u in find_units(build_transformer("flux", "tiny"))]
    assert max(blocks) >= 1  # the single-stream blocks are numbered after the dual-stream ones
    _, half = unit_groups(units, "half")
    assert half.tolist() == [int(b >= (max(blocks) + 1) / 2) for b in blocks]


def test_names_of_no_backbone_are_refused_with_what_to_use():
    with pytest.raises(ValueError, match="not named like a unit of a backbone"):
        unit_kinds(["layer.0.mystery"])
    assert unit_groups(["a", "b"], "all")[1].tolist() == [0, 0]  # no kinds needed

"""Stage-wise structural pruning end to end on a tiny model: the Hydra task exports a plan, and `infer` and the
evaluation harness run it (routed and stitched)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from diffsparse.models.loading import load_model
from diffsparse.prune.plan import PrunePlan, level_macs, saved_fraction

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def compose_prune(out: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=["experiment=tiny_prune", "logger=csv", f"output_dir={out}",
                                                       *overrides])  # fmt: skip


@pytest.mark.parametrize("schedule", ["uniform", "mosaic", "search"])
def test_prune_task_exports_a_plan_that_runs(schedule, tmp_path):
    from diffsparse.tasks.prune import prune

    result = prune(compose_prune(tmp_path, f"prune.schedule={schedule}"))
    plan = PrunePlan.load(result["pruned"])
    assert plan.stage_levels == result["stage_levels"] and plan.meta["schedule"] == schedule
    assert len(plan.stage_levels) == {"uniform": 1, "mosaic": 3, "search": 4}[schedule]
    assert 0.1 < result["saved_macs"] < 0.6
    assert (tmp_path / "pruned" / "plan.png").is_file()
    metrics = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()  # logged (search: per generation)
    assert ("search/best" if schedule == "search" else "prune/saved_macs") in metrics
    if schedule == "search":
        assert result["generations"] == 2 and sum(plan.stage_levels) == result["level_sum"]
        assert (tmp_path / "search_state.json").is_file() and (tmp_path / "search.png").is_file()
    macs = plan.meta["level_gmacs"]  # counted on the full store; the plan's store keeps only its levels
    with pytest.raises(ValueError, match="not in this store"):
        level_macs(load_model("tiny").transformer, plan.store, load_model("tiny").probe_inputs())
    assert saved_fraction(plan.stage_levels, plan.store.boundaries, plan.meta["timesteps"], macs) == pytest.approx(
        result["saved_macs"]
    )


def test_prune_task_refuses_bad_options_before_any_work(tmp_path):
    from diffsparse.tasks.prune import prune

    for override, message in (("prune.method=magnitude", "prune.method"), ("prune.schedule=every", "prune.schedule"),
                              ("prune.budget=1.5", "prune.budget")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            prune(compose_prune(tmp_path, override))
    assert not (tmp_path / "pruned").exists()


def test_infer_runs_a_pruning_plan(tmp_path, capsys):
    from diffsparse.tasks.infer import infer
    from diffsparse.tasks.prune import prune

    result = prune(compose_prune(tmp_path / "p", "prune.schedule=mosaic"))
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="infer", overrides=[f"pruned={result['pruned']}", "model=tiny",
                                                      f"output_dir={tmp_path}", "rounds=1"])  # fmt: skip
    metrics = infer(cfg)
    assert metrics["mac_reduction"] == pytest.approx(1 / (1 - result["saved_macs"]), rel=1e-6)
    assert 0 < metrics["psnr_vs_dense"] < 100 and (tmp_path / "samples.png").is_file()
    assert "pruned" in capsys.readouterr().out


def test_evaluate_refuses_a_missing_plan(tmp_path):
    from diffsparse.evaluate.harness import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--pruned", f"x={tmp_path}"])
    with pytest.raises(SystemExit):
        parse_args(["--pruned", "nothing"])
    with pytest.raises(SystemExit):
        parse_args(["--stitched", "x"])  # not a --pruned plan


def test_evaluate_rows_for_a_plan_routed_and_stitched(tmp_path):
    import csv

    from diffsparse.evaluate.command import main
    from diffsparse.tasks.prune import prune

    plan = prune(compose_prune(tmp_path / "p", "prune.schedule=mosaic", "prune.num_steps=5"))["pruned"]
    out = tmp_path / "eval"
    main(["--model", "tiny", "--quick", "--methods", "dense", "--pruned", f"mosaic={plan}", "--stitched",
          "--feature-net", "digits", "--threads", "1", "--out", str(out)])  # fmt: skip
    with open(out / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    routed, stitched = rows["mosaic"], rows["mosaic (stitched)"]
    assert routed["fd"] and routed["fd"] == stitched["fd"] and routed["l2"] == stitched["l2"]  # one network, two ways
    assert float(stitched["weights_mb"]) > float(routed["weights_mb"]) > float(rows["dense"]["weights_mb"])
    assert float(routed["mac_reduction"]) > 1.1 and float(routed["prep_minutes"]) > 0
    assert "weights MB" in (out / "results.md").read_text()

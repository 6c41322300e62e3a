"""The Hydra entry points and every config group, composed the way `train.py` / `infer.py` compose them."""

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from diffsparse import Schedule, ScheduleError
from diffsparse.backbones import tiny_pipeline
from diffsparse.evaluate.metrics import PSNR_CAP
from diffsparse.learn.data import ConditionDataModule
from diffsparse.learn.export import ScheduleExport
from diffsparse.learn.module import ScheduleLearner
from diffsparse.models.loading import load_pipeline
from diffsparse.tasks.infer import infer
from diffsparse.tasks.learn import with_model_settings
from diffsparse.tasks.schedule import make_schedule

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def compose_cfg(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.mark.parametrize("allocator", sorted(p.stem for p in (Path(CONF) / "allocator").glob("*.yaml")))
def test_train_exports_a_schedule_for_every_allocator(tmp_path, allocator):
    cfg = compose_cfg("train", [f"allocator={allocator}", "num_steps=6", f"output_dir={tmp_path}"])
    metrics = make_schedule(cfg)
    schedule = Schedule.load(tmp_path / "schedule.json")
    assert schedule.num_steps == 6 and schedule.grid[1:].any()
    assert (tmp_path / "schedule.png").stat().st_size > 0
    assert metrics["mac_reduction"] > 1.0


def test_the_learn_task_is_built_from_its_configs(tmp_path):
    """Learner, data, callbacks and Trainer are `_target_`s; the learner's model is the `model` group's."""
    cfg = with_model_settings(compose_cfg("train", ["experiment=tiny_stage1", "logger=csv", f"output_dir={tmp_path}"]))
    learner = instantiate(cfg.learn, _partial_=True)(model=OmegaConf.to_container(cfg.model, resolve=True))
    assert isinstance(learner, ScheduleLearner) and learner.hparams.num_steps == 8
    assert learner.transformer.config.num_layers == 2  # model=tiny, from the experiment's model group
    data = instantiate(cfg.data, num_classes=learner.num_classes)
    assert isinstance(data, ConditionDataModule) and (data.num_classes, data.train_size) == (10, 8)
    callbacks = {name: instantiate(node) for name, node in cfg.callbacks.items()}
    checkpoint, export = callbacks["model_checkpoint"], callbacks["schedule_export"]
    assert isinstance(checkpoint, ModelCheckpoint) and isinstance(export, ScheduleExport)
    assert (checkpoint.monitor, checkpoint.mode, checkpoint.save_last) == ("val/score", "min", True)
    assert checkpoint.dirpath == str(tmp_path / "checkpoints") and export.metrics_path == tmp_path / "metrics.json"
    trainer = instantiate(cfg.trainer, _partial_=True)(callbacks=list(callbacks.values()), logger=False)
    assert isinstance(trainer, L.Trainer) and trainer.checkpoint_callback is checkpoint and trainer.max_epochs == 1
    ddp = compose_cfg("train", ["trainer=ddp", f"output_dir={tmp_path}"]).trainer
    assert (ddp._target_, ddp.strategy, ddp.devices, ddp.max_epochs) == ("lightning.Trainer", "ddp_spawn", 2, 4)


def test_infer_runs_a_schedule_and_reports(tmp_path):
    train_cfg = compose_cfg("train", ["model=dit_tiny", "num_steps=5", f"output_dir={tmp_path / 'train'}"])
    make_schedule(train_cfg)
    path = tmp_path / "train" / "schedule.json"
    cfg = compose_cfg("infer", [f"schedule={path}", "rounds=1", "model=dit_tiny", f"output_dir={tmp_path / 'infer'}"])
    metrics = infer(cfg)
    assert metrics["num_steps"] == 5
    assert metrics["mac_reduction"] > 1.2
    assert 0 < metrics["speedup_min"] <= metrics["speedup"] <= metrics["speedup_max"]
    assert 5 < metrics["psnr_vs_dense"] < float("inf")
    assert Path(metrics["grid"]).is_file()
    cfg = compose_cfg("infer", [f"schedule={path}", "num_steps=7", "model=dit_tiny", f"output_dir={tmp_path / 'x'}"])
    with pytest.raises(ScheduleError, match="has 5 steps but num_steps=7"):
        infer(cfg)


def test_infer_with_sparsity_zero_reproduces_dense(tmp_path):
    overrides = ["schedule=null", "sparsity=0.0", "num_steps=4", "rounds=1", "model=dit_tiny"]
    overrides.append(f"output_dir={tmp_path}")
    cfg = compose_cfg("infer", overrides)
    assert infer(cfg)["psnr_vs_dense"] == PSNR_CAP  # identical images: the cap of the one PSNR definition


def test_model_configs_load_from_a_saved_pipeline(tmp_path):
    for backbone in ("dit", "pixart"):
        pipe = tiny_pipeline(backbone)
        pipe.save_pretrained(tmp_path / backbone)
        name = {"dit": "dit_xl_256", "pixart": "pixart_alpha_512"}[backbone]
        cfg = compose_cfg("infer", [f"model={name}", f"model.pretrained={tmp_path / backbone}"])
        loaded = instantiate(cfg.model)
        for a, b in zip(pipe.transformer.parameters(), loaded.transformer.parameters(), strict=True):
            assert torch.equal(a, b)


def test_missing_weights_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        load_pipeline(str(tmp_path / "nothing-here"))
    with pytest.raises(OSError, match="download the weights elsewhere"):
        load_pipeline("facebook/DiT-XL-2-256")


def test_the_readme_main_job_runs_from_the_command_line(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "infer.py", "rounds=1", f"hydra.run.dir={tmp_path}"],  # the shipped model and schedule
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "measured speed-up" in run.stdout and "MACs: dense" in run.stdout
    assert (tmp_path / "samples.png").is_file()


def test_reference_config_trains_both_networks_and_writes_the_card(tmp_path):
    from diffsparse.tasks.reference import train_reference_model

    overrides = [
        f"output_dir={tmp_path}", "steps=2", "batch_size=4", "warmup=1", "feature_net_epochs=1",
        "card.steps=2", "card.samples=20", "card.sweep_samples=0",
    ]  # fmt: skip
    result = train_reference_model(compose_cfg("reference", overrides))
    assert result["reference"]["steps"] == 2
    card = (tmp_path / "digits_dit" / "README.md").read_text()
    assert "class accuracy" in card and "python train.py --config-name reference" in card
    assert (tmp_path / "digits_dit" / "samples.png").is_file()
    assert (tmp_path / "digits_classifier" / "model.safetensors").is_file()


def test_feature_net_config(tmp_path):
    from diffsparse.tasks import TRAIN_TASKS

    result = TRAIN_TASKS["feature_net"](compose_cfg("feature_net", [f"output_dir={tmp_path}", "epochs=1"]))
    assert 0.1 < result["held_out_accuracy"] <= 1.0

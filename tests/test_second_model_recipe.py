"""The reference's training recipe with another architecture and noise schedule (`train_reference(num_layers=...,
beta_schedule=...)`, `python train.py --config-name second_model`): the settings reach the saved model folder,
which `diffsparse.load_model(path=...)` loads; the defaults stay the shipped reference's."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from diffsparse import load_model
from diffsparse.reference.model import (
    ARCHITECTURE,
    NOISE_SCHEDULE,
    build_reference_transformer,
    reference_noise_schedule,
)
from diffsparse.reference.training import train_reference
from diffsparse.tasks import TRAIN_TASKS

CONF = str(Path(__file__).resolve().parents[1] / "conf")
COSINE = "squaredcos_cap_v2"


def compose_cfg(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def test_architecture_and_noise_schedule_reach_the_saved_folder(tmp_path):
    recipe = train_reference(
        tmp_path, steps=2, batch_size=8, warmup=1, log_every=1,
        num_layers=2, num_attention_heads=2, attention_head_dim=16, beta_schedule=COSINE,
    )  # fmt: skip
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert (config["num_layers"], config["num_attention_heads"], config["attention_head_dim"]) == (2, 2, 16)
    schedule = json.loads((tmp_path / "noise_schedule.json").read_text())
    assert schedule == {**NOISE_SCHEDULE, "beta_schedule": COSINE}
    assert recipe["architecture"]["num_layers"] == 2 and recipe["noise_schedule"] == schedule
    assert json.loads((tmp_path / "training.json").read_text())["architecture"] == recipe["architecture"]

    model = load_model(path=tmp_path)
    assert len(model.transformer.transformer_blocks) == 2 and model.sample_shape == (1, 16, 16)
    assert model.noise_schedule["beta_schedule"] == COSINE
    ddim = model.scheduler("ddim")
    assert ddim.config.beta_schedule == COSINE
    linear = load_model("reference").scheduler("ddim")
    assert not torch.allclose(ddim.alphas_cumprod, linear.alphas_cumprod)  # the cosine betas, not the linear ones


def test_the_defaults_are_the_shipped_reference():
    defaults = {k: p.default for k, p in inspect.signature(train_reference).parameters.items()}
    for key in ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size"):
        assert defaults[key] == ARCHITECTURE[key]
    assert defaults["beta_schedule"] == NOISE_SCHEDULE["beta_schedule"] == "linear"
    assert reference_noise_schedule() == NOISE_SCHEDULE
    built = build_reference_transformer(0).config
    assert all(built[k] == v for k, v in ARCHITECTURE.items())
    cfg = compose_cfg("reference", [])
    assert dict(cfg.architecture) == {k: ARCHITECTURE[k] for k in cfg.architecture}
    assert cfg.beta_schedule == "linear" and cfg.model_dir == "digits_dit" and cfg.card.readme
    assert cfg.feature_net_epochs > 0 and cfg.steps == 5000


def test_an_unknown_architecture_setting_is_refused():
    with pytest.raises(ValueError, match="num_blocks"):
        build_reference_transformer(0, num_blocks=2)


def test_the_second_model_config_trains_into_output_dir(tmp_path):
    cfg = compose_cfg(
        "second_model",
        [
            f"output_dir={tmp_path}", "threads=null", "steps=2", "batch_size=8", "warmup=1",
            "architecture.num_layers=2", "card.samples=10", "card.steps=2",
        ],
    )  # fmt: skip
    assert cfg.architecture.num_attention_heads * cfg.architecture.attention_head_dim == 96
    result = TRAIN_TASKS[cfg.task](cfg)
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert (config["num_layers"], config["num_attention_heads"], config["attention_head_dim"]) == (2, 3, 32)
    assert json.loads((tmp_path / "noise_schedule.json").read_text())["beta_schedule"] == COSINE
    assert not (tmp_path / "digits_classifier").exists() and not (tmp_path / "README.md").exists()
    quality = json.loads((tmp_path / "quality.json").read_text())
    assert quality["samples"] == 10 and quality["steps"] == 2 and result["quality"]["samples"] == 10
    assert (tmp_path / "samples.png").is_file()
    assert load_model(path=tmp_path).transformer.config.num_layers == 2

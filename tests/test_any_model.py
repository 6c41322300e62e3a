"""Any user's model, named one way for every task: `model=NAME` or `model=local model.path=DIR`, and
`diffsparse.load_model` in Python. Class counts and latent shapes come from the model, not from constants."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, FluxPipeline
from hydra import compose, initialize_config_dir

from diffsparse import Schedule, cacheable_units
from diffsparse.backbones.flux import tiny_flux_pipeline
from diffsparse.evaluate.inference import run_inference
from diffsparse.models.generate import generate
from diffsparse.models.loading import MODELS, load_model
from diffsparse.reference.model import REFERENCE_DIR
from diffsparse.tasks.common import load_configured_model
from diffsparse.tasks.infer import infer
from diffsparse.tasks.learn import learn_schedule

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")


def compose_cfg(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture(scope="module")
def eight_class_dit(tmp_path_factory) -> Path:
    """A user's own pixel DiT: 8 classes, width 32 (not the reference's 128), 2 blocks, laid out as the shipped
    reference (`transformer/` + `noise_schedule.json`)."""
    path = tmp_path_factory.mktemp("user_dit")
    torch.manual_seed(1)
    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=1, num_layers=2, sample_size=16,
        patch_size=2, norm_num_groups=1, num_embeds_ada_norm=8,
    )  # fmt: skip
    model.save_pretrained(path / "transformer")
    shutil.copy(REFERENCE_DIR / "noise_schedule.json", path / "noise_schedule.json")
    return path


def test_a_saved_dit_takes_its_class_count_from_its_config(eight_class_dit):
    ref = load_model(path=eight_class_dit)
    assert ref.num_classes == 8 and ref.sample_shape == (1, 16, 16)
    assert load_model(str(eight_class_dit)).num_classes == 8  # a path as the name, as `evaluate --model DIR`
    assert ref.probe_inputs()["class_labels"].tolist() == [0, 8]  # the null class is the model's, not the digits'
    images = generate(ref, [0, 7], num_steps=2, guidance_scale=1.5)
    assert images.shape == (2, 1, 16, 16) and 0 <= images.min() and images.max() <= 1
    with pytest.raises(ValueError, match="this model has 8 classes"):
        generate(ref, [0, 9], num_steps=2)


def test_bad_model_folders_say_what_is_missing(tmp_path, eight_class_dit):
    with pytest.raises(FileNotFoundError, match="No model named 'no-such-model'"):
        load_model("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a saved pipeline"):
        load_model(path=tmp_path / "empty")
    shutil.copytree(eight_class_dit / "transformer", tmp_path / "bare" / "transformer")
    with pytest.raises(FileNotFoundError, match=r"no noise schedule: expected .*noise_schedule\.json"):
        load_model(path=tmp_path / "bare")
    with pytest.raises(ValueError, match="exactly one model"):
        load_model("tiny", path=eight_class_dit)


def test_every_model_config_names_a_registered_model():
    names = {p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")} - {"local"}
    for name in names:
        cfg = compose_cfg("train", [f"model={name}"])
        assert cfg.model._target_ == "diffsparse.models.loading.load_model"
        assert cfg.model.name_or_path == name and name in MODELS


@pytest.mark.parametrize("task", ["learn", "search", "prune"])
def test_the_model_group_chooses_the_model_of_every_task(task):
    experiment = {"learn": "digits_stage1", "search": "search_evolution", "prune": "prune_mosaic"}[task]
    cfg = compose_cfg("train", [f"experiment={experiment}", "model=tiny"])
    assert cfg.task == task
    assert "model" not in cfg[task]  # no second way to name it
    assert load_configured_model(cfg).transformer.config.num_layers == 2  # the tiny DiT, not the 6-block digits one
    assert compose_cfg("train", [f"experiment={experiment}"]).model.name_or_path == "reference"


def test_train_learns_on_a_users_dit_and_infer_runs_it(eight_class_dit, tmp_path):
    overrides = [
        "experiment=digits_stage1", "model=local", f"model.path={eight_class_dit}", "learn.num_steps=6",
        "data.train_size=8", "data.val_size=8", "data.batch_size=8", "trainer.max_epochs=1", "logger=csv",
        f"output_dir={tmp_path / 'learn'}",
    ]  # fmt: skip
    cfg = compose_cfg("train", overrides)
    metrics = learn_schedule(cfg)
    schedule = Schedule.load(tmp_path / "learn" / "schedule.json")
    ref = load_model(path=eight_class_dit)
    assert list(schedule.units) == cacheable_units(
        ref.transformer
    )  # learned on this model: 2 blocks, not the digits' 6
    assert schedule.num_steps == 6 and metrics["best_val"] is not None
    cfg = compose_cfg(
        "infer",
        ["model=local", f"model.path={eight_class_dit}", f"schedule={tmp_path / 'learn' / 'schedule.json'}",
         "rounds=1", f"output_dir={tmp_path / 'infer'}"],
    )  # fmt: skip
    result = infer(cfg)
    assert result["num_steps"] == 6 and result["mac_reduction"] > 1.0
    assert Path(result["grid"]).is_file()
    bad = [
        "model=local",
        f"model.path={eight_class_dit}",
        "schedule=null",
        "conditions=[0,9]",
        f"output_dir={tmp_path}",
    ]
    with pytest.raises(ValueError, match="this model has 8 classes"):
        infer(compose_cfg("infer", bad))
    with pytest.raises(ValueError, match="schedule=shipped is the reference model's"):
        infer(compose_cfg("infer", ["model=local", f"model.path={eight_class_dit}", f"output_dir={tmp_path}"]))


def _flux_pipeline_with_an_8x_vae(path: Path) -> Path:
    """The tiny FLUX pipeline with a 4-level VAE (8 pixels per latent, as FLUX's own), saved: 256 x 256 images are
    then 32 x 32 latents (256 tokens), 512 x 512 ones 64 x 64 (1024 tokens)."""
    pipe = tiny_flux_pipeline()
    torch.manual_seed(0)
    pipe.vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4), layers_per_block=1, latent_channels=pipe.transformer.config.in_channels // 4,
        norm_num_groups=2, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()  # fmt: skip
    FluxPipeline(**pipe.components).save_pretrained(path)
    return path


def test_flux_latent_shapes_come_from_the_requested_size(tmp_path):
    path = _flux_pipeline_with_an_8x_vae(tmp_path / "flux")
    channels = load_model(path=path).transformer.config.in_channels // 4
    assert load_model(path=path).sample_shape == (channels, 128, 128)  # the pipeline's default: 1024 x 1024
    dense_gmacs = {}
    for side in (256, 512):
        ref = load_model(path=path, height=side, width=side)
        assert ref.sample_shape == (channels, side // 8, side // 8)
        ref.pipeline.set_progress_bar_config(disable=True)
        images = generate(ref, ["a photo of a cat"], num_steps=2, guidance_scale=0.0)
        assert images.shape == (1, 3, side, side)
        schedule = Schedule.uniform(units=cacheable_units(ref.transformer), num_steps=2, sparsity=0.5)
        result = run_inference(ref, schedule, ["a photo of a cat"], rounds=1, guidance_scale=0.0)
        assert result["mac_reduction"] > 1.0
        dense_gmacs[side] = result["dense_gmacs"]
    assert dense_gmacs[512] > 3 * dense_gmacs[256]  # four times the image tokens (the text tokens stay)
    with pytest.raises(ValueError, match="multiples of 16"):
        load_model(path=path, height=200, width=256)


def _train_py(*overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_an_unknown_experiment_fails(tmp_path):
    run = _train_py("experiment=tiny_stage", f"hydra.run.dir={tmp_path}")
    assert run.returncode != 0
    assert "Could not find 'experiment/tiny_stage'" in run.stderr and "tiny_stage1" in run.stderr
    assert not (tmp_path / "schedule.json").exists()


def test_stage_two_without_its_checkpoint_fails(tmp_path):
    run = _train_py("experiment=tiny_stage2", "logger=csv", f"hydra.run.dir={tmp_path}")
    assert run.returncode != 0
    assert "learn.stage1_checkpoint" in run.stderr
    assert not (tmp_path / "schedule.json").exists()


def test_a_killed_training_run_exits_non_zero(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "train.py", "experiment=tiny_stage1", "trainer.max_epochs=100000", "logger=csv",
         f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    last = tmp_path / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, "training ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "SIGTERM" in stderr and "ckpt_path=" in stderr
    assert not (tmp_path / "schedule.json").exists()


def test_model_local_without_a_path_says_what_to_set(tmp_path):
    with pytest.raises(ValueError, match=r"model\.path=\.\.\."):
        infer(compose_cfg("infer", ["model=local", f"output_dir={tmp_path}"]))


def test_noise_schedule_file_is_read_as_saved(eight_class_dit):
    saved = json.loads((eight_class_dit / "noise_schedule.json").read_text())
    assert load_model(path=eight_class_dit).noise_schedule == saved


def test_options_a_loader_does_not_take_are_refused(eight_class_dit):
    with pytest.raises(ValueError, match=r"load_model\('tiny'\) does not take the options \['heigth'\]"):
        load_model("tiny", heigth=32)
    with pytest.raises(ValueError, match="does not take the options"):
        load_model("reference", height=32)  # the shipped model has one size
    with pytest.raises(ValueError, match="positive number of pixels"):
        load_model(path=eight_class_dit, height=-16)
    with pytest.raises(ValueError, match="frames"):
        load_model(path=eight_class_dit, frames=5)


def test_model_local_takes_a_size_as_the_readme_says(eight_class_dit):
    cfg = compose_cfg("train", ["model=local", f"model.path={eight_class_dit}", "model.height=32", "model.width=32"])
    assert load_configured_model(cfg).sample_shape == (1, 32, 32)  # a pixel model: latents are the pixels

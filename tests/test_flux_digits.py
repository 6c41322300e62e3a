"""The FLUX-architecture digits model's training task, on a tiny run: it saves a stock `FluxPipeline` folder that
loads offline, whose captions the tiny tokenizers know, and on which the token cache at sparsity 0 is exact."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from omegaconf import OmegaConf

from diffsparse import Schedule, enable_token_cache
from diffsparse.backbones.tiny_parts import TINY_VOCABULARY
from diffsparse.evaluate.cli import parse_args
from diffsparse.models.captions import CAPTION_LABELS, load_captions
from diffsparse.models.loading import load_model, run_settings
from diffsparse.reference.flux_digits import (
    CAPTION_TEMPLATES,
    DIGIT_WORDS,
    FLUX_DIGITS_DIR,
    IMAGE_SIZE,
    MAX_SEQUENCE_LENGTH,
    all_captions,
    measure_samples,
)
from diffsparse.tasks.flux_digits import train_flux_digits


def test_every_caption_is_made_of_known_words_and_fits_the_text_tokens():
    captions = all_captions()
    assert len(captions) == 10 * len(CAPTION_TEMPLATES) == len(set(captions))
    assert all(w in TINY_VOCABULARY for c in captions for w in c.split())
    assert max(len(c.split()) for c in captions) + 1 <= MAX_SEQUENCE_LENGTH  # and the end-of-sequence token


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("flux_digits")
    cfg = OmegaConf.load("conf/flux_digits.yaml")
    cfg.output_dir = str(out)
    cfg.merge_with(
        {
            "steps": 3,
            "batch_size": 4,
            "warmup": 1,
            "autoencoder": {"steps": 2, "batch_size": 4},
            "architecture": {"num_layers": 1, "num_single_layers": 1},
            "card": {"samples": 10, "steps": 2},
        }
    )
    result = train_flux_digits(cfg)
    return out, result


def test_the_trained_model_is_a_stock_flux_pipeline_folder_with_its_card(trained):
    out, result = trained
    pipe = FluxPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.transformer.config.num_single_layers == 1 and pipe.vae.config.in_channels == 1
    assert pipe.vae.config.shift_factor != 0.0 and pipe.vae.config.scaling_factor > 0  # set from its latents
    training = json.loads((out / "training.json").read_text())
    assert training["config"]["steps"] == 3 and training["final_loss"] > 0
    quality = json.loads((out / "quality.json").read_text())
    assert quality["samples"] == 10 and len(quality["per_class_accuracy"]) == 10
    for name in ("loss.png", "autoencoder_loss.png", "samples.png"):
        assert (out / name).stat().st_size > 0
    # the project's loader sees a FLUX pipeline folder (FluxPipeline's default size is 1024 px: say the digits')
    handle = load_model(str(out), height=IMAGE_SIZE, width=IMAGE_SIZE)
    assert handle.text_conditioned and tuple(handle.sample_shape) == (4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)


def test_the_token_cache_at_sparsity_0_is_exact_on_it(trained):
    out, _ = trained
    pipe = FluxPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def call():
        g = torch.Generator().manual_seed(0)
        return pipe(["the digit seven", "a drawing of a two"], height=IMAGE_SIZE, width=IMAGE_SIZE,
                    num_inference_steps=4, max_sequence_length=MAX_SEQUENCE_LENGTH, generator=g,
                    output_type="pt").images  # fmt: skip

    dense = call()
    enable_token_cache(pipe, Schedule.uniform(pipe.transformer, num_steps=4, sparsity=0.0))
    assert torch.equal(call(), dense)


def test_the_card_and_the_caption_embeddings_are_written_beside_the_model(trained):
    out, result = trained
    card = (out / "README.md").read_text()
    assert "class accuracy" in card and result["quality"]["accuracy"] in card and "samples.png" in card
    lines = (out / "captions.txt").read_text().splitlines()
    tensors, captions = load_captions(out / "captions.safetensors")
    assert len(lines) == len(captions) == len(tensors["prompt_embeds"]) == 3 * 10 * len(CAPTION_TEMPLATES)
    labels = tensors[CAPTION_LABELS]
    assert labels.tolist() == [i % 10 for i in range(len(captions))]  # any 10 conditions in a row hold every digit
    assert all(DIGIT_WORDS[c] in t.split() for c, t in zip(labels.tolist(), captions, strict=True))
    assert [line.split("\t") for line in lines[:2]] == [["0", captions[0]], ["1", captions[1]]]


def test_the_shipped_model_draws_the_digit_its_caption_names():
    """The shipped weights, sampled by the stock pipeline: 30 samples, scored by the digits feature network (its
    card measured 500)."""
    pipe = FluxPipeline.from_pretrained(FLUX_DIGITS_DIR, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    m = measure_samples(pipe, steps=20, samples=30, seed=1000)
    assert m["accuracy"].value >= 0.8


def test_the_shipped_model_runs_in_the_stock_pipeline_with_the_cache_exact_at_sparsity_0():
    handle = load_model("digits-flux")
    assert handle.text_conditioned and tuple(handle.sample_shape) == (4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)
    pipe = handle.pipeline
    pipe.set_progress_bar_config(disable=True)

    def call():
        g = torch.Generator().manual_seed(0)
        return pipe(["a small nine", "the digit four"], height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=5,
                    max_sequence_length=MAX_SEQUENCE_LENGTH, generator=g, output_type="pt").images  # fmt: skip

    dense = call()
    enable_token_cache(pipe, Schedule.uniform(pipe.transformer, num_steps=5, sparsity=0.0))
    assert torch.equal(call(), dense)


def test_a_named_model_brings_its_own_settings_and_the_command_line_wins(trained):
    out, _ = trained
    flux = run_settings("digits-flux")
    assert (flux["sampler"], flux["num_steps"], flux["guidance"], flux["feature_net"]) == ("flow", 20, 1.0, "digits")
    assert Path(flux["captions"]).is_file()
    ref = run_settings({"_target_": "diffsparse.models.loading.load_model", "name_or_path": "reference"})
    assert (ref["sampler"], ref["num_steps"], ref["guidance"], ref["captions"]) == ("ddim", 50, 1.25, None)
    assert run_settings(str(out))["sampler"] == "flow"  # a saved flow-matching pipeline folder, read not loaded
    cfg = parse_args(["--model", "digits-flux"])
    assert (cfg.steps, cfg.guidance, cfg.captions, cfg.feature_net) == (20, 1.0, flux["captions"], None)
    assert parse_args(["--model", "digits-flux", "--steps", "28", "--guidance", "2"]).steps == 28
    assert parse_args(["--model", "digits-flux", "--quick"]).steps == 5
    assert (parse_args([]).steps, parse_args([]).guidance) == (50, 1.25)

"""FLUX and Wan2.1 sizes and tiny stock pipelines: forwards on the example inputs, deterministic pipeline calls and
save / load round trips, all offline."""

import json

import pytest
import torch
from conftest import call_flow_pipeline
from diffusers import FluxPipeline, WanPipeline, WanTransformer3DModel

from diffsparse.backbones.flux import FLUX_SIZES, build_flux, flux_example_inputs
from diffsparse.backbones.wan import WAN_SIZES, build_wan, wan_example_inputs


@pytest.fixture
def flux_pipe(flow_pipelines):
    return flow_pipelines["flux"]


@pytest.fixture
def wan_pipe(flow_pipelines):
    return flow_pipelines["wan"]


def call_flux(pipe) -> torch.Tensor:
    return call_flow_pipeline(pipe, steps=3)


def call_wan(pipe, guidance_scale: float = 1.0) -> torch.Tensor:
    return call_flow_pipeline(pipe, steps=3, guidance_scale=guidance_scale)


# Why a reloaded pipeline is compared by its components and by close (not bit-equal) outputs:
# `from_pretrained` (diffusers 0.42 `load_state_dict` -> `safetensors.torch.load_file`, safetensors 0.8) returns
# the weights as zero-copy views into a private mmap of each .safetensors file, at the file's data offsets, which
# safetensors aligns to 8 bytes only; the weights built in memory sit at torch's 64-byte-aligned allocations. The
# values are bit-equal (checked below), but oneMKL's BLAS does not promise the same bits for differently aligned
# operands (oneMKL developer guide, "Conditional Numerical Reproducibility": aligned inputs are one of its
# reproducibility conditions). Measured: on an AVX-512 Xeon the round trip happens to stay bit-equal, but with
# MKL_ENABLE_INSTRUCTIONS=SSE4_2 a batch-1 `F.linear` (sgemv) gives different bits for 8-byte-offset weights, and
# both pipelines' outputs differ by ~4e-7 after 3 steps; copying the reloaded transformer's weights into fresh
# tensors makes them bit-equal again. So the bits of a reloaded pipeline depend on the CPU's MKL code path.
# Pixels in [0, 1]: the alignment noise is ~4e-7, while scaling one transformer weight matrix by 1.001 moves them
# by ~2e-5 and a 1% larger scheduler shift by ~3e-3 (the equal state dicts and configs catch any such change).
ROUND_TRIP_ATOL = 1e-5
ROUND_TRIP_PROMPTS = ["a photo of a cat", "a zebra drawing", ""]  # known words, an unknown word, the empty prompt


def public_config(component) -> dict:
    """The component's config without private keys (`_name_or_path` is the load path), tuples read as lists."""
    config = component.config
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, default=str))


def assert_same_components(pipe, loaded):
    """What save_pretrained / from_pretrained promise: every weight, config and tokenization comes back unchanged."""
    assert loaded.components.keys() == pipe.components.keys()
    for name, component in pipe.components.items():
        reloaded = loaded.components[name]
        assert type(reloaded) is type(component), name
        if isinstance(component, torch.nn.Module):
            saved, read = component.state_dict(), reloaded.state_dict()
            assert read.keys() == saved.keys(), name
            for key, value in saved.items():
                assert read[key].dtype == value.dtype and torch.equal(read[key], value), f"{name}.{key}"
            assert reloaded.training == component.training, name
        if hasattr(component, "config"):
            assert public_config(reloaded) == public_config(component), name
        if name.startswith("tokenizer"):
            assert reloaded.model_max_length == component.model_max_length, name
            for prompt in ROUND_TRIP_PROMPTS:
                kwargs = dict(padding="max_length", max_length=8, truncation=True)
                assert reloaded(prompt, **kwargs).input_ids == component(prompt, **kwargs).input_ids, (name, prompt)


@pytest.mark.parametrize("grid", [(8, 8), (4, 6)])
def test_flux_example_inputs_run(grid):
    model = build_flux("tiny")
    height, width = grid
    inputs = flux_example_inputs(model, batch=2, height=height, width=width, text_tokens=5)
    rows, cols = inputs["img_ids"][:, 1], inputs["img_ids"][:, 2]
    assert rows.reshape(height, width)[:, 0].tolist() == list(range(height))
    assert cols.reshape(height, width)[0].tolist() == list(range(width))
    assert inputs["txt_ids"].shape == (5, 3) and not inputs["txt_ids"].any()
    with torch.no_grad():
        out = model(**inputs).sample
    assert out.shape == (2, height * width, model.config.in_channels)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("frames", [1, 2])
def test_wan_example_inputs_run(frames):
    model = build_wan("tiny")
    inputs = wan_example_inputs(model, batch=2, frames=frames, height=8, width=6)
    with torch.no_grad():
        out = model(**inputs).sample
    assert out.shape == (2, model.config.out_channels, frames, 8, 6)
    assert torch.isfinite(out).all()


def test_seed_sets_the_weights():
    a, b, c = build_flux(seed=0), build_flux(seed=0), build_flux(seed=1)
    inputs = flux_example_inputs(a)
    with torch.no_grad():
        assert torch.equal(a(**inputs).sample, b(**inputs).sample)
        assert not torch.equal(a(**inputs).sample, c(**inputs).sample)


def test_sizes_fit_their_rope():
    for cfg in FLUX_SIZES.values():
        assert sum(cfg["axes_dims_rope"]) == cfg["attention_head_dim"]
    for cfg in WAN_SIZES.values():  # Wan splits each head into t / h / w rope parts, each even and non-empty
        h_dim = 2 * (cfg["attention_head_dim"] // 6)
        t_dim = cfg["attention_head_dim"] - 2 * h_dim
        assert h_dim > 0 and t_dim > 0 and t_dim % 2 == 0


def test_unknown_size_names_the_sizes():
    with pytest.raises(ValueError, match="tiny.*bench.*schnell"):
        build_flux("nope")
    with pytest.raises(ValueError, match="tiny.*bench.*1.3B"):
        build_wan("nope")


def test_overrides_replace_size_arguments():
    assert build_flux("tiny", num_single_layers=2).config.num_single_layers == 2
    assert build_wan("tiny", num_layers=1).config.num_layers == 1


def test_flux_pipeline_is_deterministic(flux_pipe):
    images = call_flux(flux_pipe)
    assert images.shape == (1, 3, 16, 16)
    assert torch.isfinite(images).all() and images.std() > 0
    assert torch.equal(images, call_flux(flux_pipe))


def test_flux_pipeline_round_trip(flux_pipe, tmp_path):
    flux_pipe.save_pretrained(tmp_path)
    loaded = FluxPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert_same_components(flux_pipe, loaded)
    torch.testing.assert_close(call_flux(loaded), call_flux(flux_pipe), rtol=0, atol=ROUND_TRIP_ATOL)


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_wan_pipeline_is_deterministic(wan_pipe, guidance_scale):
    frames = call_wan(wan_pipe, guidance_scale)
    assert frames.shape == (1, 5, 3, 16, 16)
    assert torch.isfinite(frames).all() and frames.std() > 0
    assert torch.equal(frames, call_wan(wan_pipe, guidance_scale))


def test_wan_guidance_changes_the_video(wan_pipe):
    assert not torch.equal(call_wan(wan_pipe, 1.0), call_wan(wan_pipe, 5.0))


def test_wan_pipeline_round_trip(wan_pipe, tmp_path):
    wan_pipe.save_pretrained(tmp_path)
    loaded = WanPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert_same_components(wan_pipe, loaded)
    torch.testing.assert_close(call_wan(loaded), call_wan(wan_pipe), rtol=0, atol=ROUND_TRIP_ATOL)


def test_wan_transformer_from_pretrained(tmp_path):
    model = build_wan("tiny")
    model.save_pretrained(tmp_path)
    loaded = WanTransformer3DModel.from_pretrained(tmp_path).eval()
    inputs = wan_example_inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, model(**inputs).sample)

"""One factory of tiny random backbones and pipelines for every test (offline, CPU)."""

from __future__ import annotations

import pytest
import torch

from diffsparse.backbones import backbone_for, build_transformer, example_inputs, tiny_pipeline

BACKBONES = ["dit", "pixart"]
TIMESTEPS = [900, 700, 500, 300, 100]


@pytest.fixture(params=BACKBONES)
def backbone(request) -> str:
    return request.param


@pytest.fixture
def model(backbone):
    return build_transformer(backbone, "tiny")


@pytest.fixture
def inputs(model):
    return example_inputs(model, batch=2)


def run_loop(model, inputs: dict, timesteps=TIMESTEPS) -> list[torch.Tensor]:
    """Call the transformer once per timestep (decreasing), as a sampling loop does; returns each output."""
    outs = []
    with torch.no_grad():
        for t in timesteps:
            kwargs = dict(inputs, timestep=torch.full((inputs["hidden_states"].shape[0],), t))
            outs.append(model(**kwargs).sample.clone())
    return outs


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


@pytest.fixture
def pipeline(backbone):
    return tiny_pipeline(backbone)


def call_pipeline(pipe, steps: int = 4, seed: int = 0) -> torch.Tensor:
    """One call of a tiny stock pipeline (CFG on), returning the images as a tensor."""
    generator = torch.Generator().manual_seed(seed)
    if not backbone_for(pipe.transformer).text_conditioned:  # DiT
        out = pipe(class_labels=[1, 3], num_inference_steps=steps, generator=generator, output_type="pt")
        return out.images
    channels = pipe.transformer.config.caption_channels
    g = torch.Generator().manual_seed(123)
    embeds = torch.randn(1, 6, channels, generator=g)
    negative = torch.randn(1, 6, channels, generator=g)
    mask = torch.ones(1, 6)
    out = pipe(
        prompt=None,
        negative_prompt=None,
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        negative_prompt_embeds=negative,
        negative_prompt_attention_mask=mask,
        num_inference_steps=steps,
        generator=generator,
        output_type="pt",
        use_resolution_binning=False,
    )
    return out.images


@pytest.fixture(scope="session")
def flow_pipelines() -> dict:
    """Tiny random stock FLUX and Wan pipelines (offline), keyed by backbone."""
    pipes = {name: tiny_pipeline(name) for name in ("flux", "wan")}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def call_flow_pipeline(pipe, steps: int = 4, guidance_scale: float | None = None, seed: int = 0, **extra):
    """One call of a tiny stock FLUX pipeline (default: no guidance, like schnell) or Wan pipeline (default: CFG 5,
    as two calls per step) on "a photo of a cat", 16 x 16 pixels (Wan: 5 frames); images or frames as a tensor."""
    generator = torch.Generator().manual_seed(seed)
    common = dict(prompt="a photo of a cat", height=16, width=16, num_inference_steps=steps, generator=generator)
    common |= {"max_sequence_length": 8, "output_type": "pt", **extra}
    spec = backbone_for(pipe.transformer)
    common["guidance_scale"] = (5.0 if spec.guided else 0.0) if guidance_scale is None else guidance_scale
    if spec.video:
        return pipe(num_frames=5, **common).frames
    return pipe(**common).images

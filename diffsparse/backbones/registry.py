"""The backbone registry: what differs between diffusion transformers is a row of data, not a copied forward.

Each backbone file (`dit.py`, `pixart.py`, `flux.py`, `wan.py`) defines one `BackboneSpec` and registers it with
`register_backbone`; everything else looks the row up (`backbone_for(model)`, `BACKBONES[name]`) instead of
branching on a name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from diffusers.utils.torch_utils import unwrap_module

SELF_ATTN = "self_attn"
CROSS_ATTN = "cross_attn"
MLP = "mlp"
JOINT_ATTN = "joint_attn"  # FLUX's dual-stream attention: one stream's queries over the image and text tokens
PARALLEL_BLOCK = "parallel_block"  # FLUX's single-stream block: attention and MLP side by side, one output
UNIT_KINDS = (SELF_ATTN, CROSS_ATTN, MLP, JOINT_ATTN, PARALLEL_BLOCK)

# How a unit computes only its fresh tokens (`diffsparse.cache.runners`):
MODULE = "module"  # the module's own forward on the fresh tokens (self-attention: keys/values from all tokens)
ROPE_SELF = "rope_self"  # self-attention with rotary embeddings that follow the fresh queries (Wan)
JOINT = "joint"  # one stream of a joint attention; both streams' keys/values are always all tokens (FLUX)
SINGLE_STREAM = "single_stream"  # the whole single-stream block on fresh image tokens, text tokens always (FLUX)

IMAGE, TEXT = "image", "text"


@dataclass(frozen=True)
class UnitSpec:
    """A cacheable unit of a block.

    Attributes:
        child: attribute of the block holding the module the unit's hook sits on ("" = the block itself).
        kind: what it computes (`UNIT_KINDS`): MAC accounting and the attention signals it can give.
        runner: how it computes only its fresh tokens (`MODULE`, `ROPE_SELF`, `JOINT`, `SINGLE_STREAM`).
        stream: the tokens it caches: `image` (on the token grid: the spatial bonus applies) or `text`.
        name: the unit's name in the block when it is not `child` (two units on one joint-attention module).
    """

    child: str
    kind: str
    runner: str = MODULE
    stream: str = IMAGE
    name: str | None = None


@dataclass(frozen=True)
class BlockList:
    """A list of transformer blocks of the model (`attr`) and the units of each block, in the order they run.

    `reused(block, hidden_states, outputs, inputs)`, where given: the block's output at a step where each of its
    units reuses all its tokens, from their outputs (by child name) and the block's forward arguments (by name),
    or None where it does not cover the block; the token cache then skips the rest of the block's work.
    `fresh_mlp(block, hidden_states, inputs, mlp)`, where given: the block's output at a step where its MLP unit
    (child `ff`) recomputes some tokens, with the MLP's norm and modulation run on those tokens only (`mlp`: that
    unit's partial compute, `TokenCacheUnitHook.fresh_rows`), or None where it does not cover the block.
    """

    attr: str
    units: tuple[UnitSpec, ...]
    reused: Callable[..., torch.Tensor | None] | None = None
    fresh_mlp: Callable[..., torch.Tensor | None] | None = None


def patch_grid(model: torch.nn.Module, inputs: dict) -> tuple[int, ...]:
    """Token grid (rows, cols) of a patchified image input `(B, C, H, W)`, or (frames, rows, cols) of a video
    input `(B, C, F, H, W)` with a 3-D patch size."""
    x, p = inputs["hidden_states"], model.config.patch_size
    if x.ndim == 5:
        return tuple(n // k for n, k in zip(x.shape[2:], p, strict=True))
    return x.shape[-2] // p, x.shape[-1] // p


def image_latent_shape(pipe, height=None, width=None, frames=None) -> tuple[int, ...] | None:
    """Latents of a patchified image model's stock pipeline (DiT, PixArt) at `height` x `width` pixels; None (the
    transformer's `sample_size`) unless a size is asked for."""
    if height is None and width is None:
        return None
    scale = getattr(pipe, "vae_scale_factor", None) or 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return (pipe.transformer.config.in_channels, (height or width) // scale, (width or height) // scale)


def batch_timestep(t, x: torch.Tensor) -> torch.Tensor:
    """Timestep `t` (a number, or a tensor of one or of x's batch) for every sample of `x`, on x's device. One value
    on the host is filled in there, not copied: a host-to-device copy at every step is a transfer a CUDA graph cannot
    capture."""
    if isinstance(t, torch.Tensor) and (t.device == x.device or t.numel() != 1):
        return t.to(x.device).expand(x.shape[0])
    value = t.item() if isinstance(t, torch.Tensor) else t
    dtype = t.dtype if isinstance(t, torch.Tensor) else torch.as_tensor(t).dtype
    return torch.full((x.shape[0],), value, dtype=dtype, device=x.device)


def plain_forward_kwargs(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, conditions: dict) -> dict:
    """Latents `x` as they are, the train timestep for every sample, and the conditions."""
    return dict(hidden_states=x, timestep=batch_timestep(t, x), **conditions)


def leading_channels(model: torch.nn.Module, sample: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The output's first C channels (C: the latents'): a learned-variance half is dropped."""
    return sample[:, : x.shape[1]]


def plain_set_steps(model: torch.nn.Module, scheduler, num_steps: int, x: torch.Tensor) -> None:
    scheduler.set_timesteps(num_steps)


@dataclass(frozen=True)
class BackboneSpec:
    """One row of the registry: everything a task needs to know about one family of diffusion transformers.

    Attributes:
        name: short name used in configs and on the command line (`dit`, `pixart`, `flux`, `wan`).
        model_classes: class names this row applies to (the model's class or a parent class).
        block_lists: the model's block lists and each block's units, in execution order.
        token_grid: maps `(model, the keyword arguments of model.forward)` to the image token grid ((rows, cols),
            or (frames, rows, cols)), or None if unknown.
        build: `build(size="tiny", seed=0, **options)`, a randomly initialised model of a size in `sizes`, eval mode.
        example_inputs: `example_inputs(model, batch=2, ..., seed=0)`, forward keywords of one random step.
        text_conditioned: conditioned on text embeddings (else on class ids).
        selector_defaults: default selector (`name`) and weights for this backbone (paper Appendix A.5.1).
        forward_kwargs: `(model, latents x, timestep t, conditions)` -> the keywords of `model.forward`, as its
            stock pipeline calls it.
        to_latents: `(model, forward output .sample, x)` -> the prediction (noise or velocity) in the shape of `x`.
        set_steps: `(model, scheduler, num_steps, x)`: `scheduler.set_timesteps` as the stock pipeline calls it.
        flow_matching: trained with flow matching (sampled with flow-matching Euler), not DDPM noise prediction.
        guided: its sampling runs classifier-free-guidance pairs (False: guidance-distilled, one call per step).
        video: latents have a frame axis `(B, C, F, H, W)`.
        prunable: structural pruning (`diffsparse.prune`) covers its blocks.
        sizes: named architectures `build` knows.
        bench_size: the size `python -m diffsparse.bench` times by default.
        bench_case: `(size, side, batch, frames)` -> (random model with `side` x `side` image tokens per frame,
            initial latents, conditions) for the benchmark; `batch` is the transformer's batch.
        pipeline_class: the diffusers class of its stock pipeline (None: no stock pipeline).
        tiny_pipeline: `tiny_pipeline(seed=0, ...)`, its stock pipeline from tiny random components, offline.
        latent_shape: `(pipe, height, width, frames)` -> latents of one sample as the stock pipeline makes them at
            that size in pixels (None: each at the pipeline's default), or None where the transformer's config
            says it.
        encode_captions: `(pipe, captions, max_sequence_length)` -> the stored caption tensors (`prompt_embeds`,
            ...) through the pipeline's own `encode_prompt`; None for class-conditional backbones.
    """

    name: str
    model_classes: tuple[str, ...]
    block_lists: tuple[BlockList, ...]
    token_grid: Callable[[torch.nn.Module, dict], tuple[int, ...] | None]
    build: Callable[..., torch.nn.Module]
    example_inputs: Callable[..., dict]
    text_conditioned: bool = False
    selector_defaults: dict = field(default_factory=dict)
    forward_kwargs: Callable[..., dict] = plain_forward_kwargs
    to_latents: Callable[..., torch.Tensor] = leading_channels
    set_steps: Callable[..., None] = plain_set_steps
    flow_matching: bool = False
    guided: bool = True
    video: bool = False
    prunable: bool = False
    sizes: Mapping[str, object] = field(default_factory=dict)
    bench_size: str = "tiny"
    bench_case: Callable[..., tuple] | None = None
    pipeline_class: str | None = None
    tiny_pipeline: Callable[..., object] | None = None
    latent_shape: Callable[..., tuple[int, ...] | None] | None = None
    encode_captions: Callable[..., dict] | None = None

    @property
    def blocks(self) -> str:
        """The attribute of the main block list (the only one for DiT, PixArt and Wan)."""
        return self.block_lists[0].attr


class UnsupportedModelError(TypeError, ValueError):
    """A model (or pipeline, or backbone name) that no registry row describes."""


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec, replace: bool = False) -> BackboneSpec:
    """Add a row to the registry (from the backbone's own file); returns it.

    Example:
        >>> MY_DIT = register_backbone(BackboneSpec(name="my_dit", model_classes=("MyDiT",), ...))
    """
    taken = {c: s.name for s in BACKBONES.values() if s.name != spec.name for c in s.model_classes}
    clash = [c for c in spec.model_classes if c in taken]
    if clash:
        raise ValueError(f"Backbone {spec.name!r}: {clash} already belong to {sorted({taken[c] for c in clash})}.")
    if spec.name in BACKBONES and BACKBONES[spec.name] is not spec and not replace:
        raise ValueError(f"A backbone named {spec.name!r} is already registered: pass replace=True to change it.")
    BACKBONES[spec.name] = spec
    return spec


def supported_models() -> list[str]:
    return [c for spec in BACKBONES.values() for c in spec.model_classes]


def find_backbone(model: torch.nn.Module) -> BackboneSpec | None:
    """The row for `model`'s class or its nearest registered parent class, or None; a `torch.compile`d model is
    looked up by the model it wraps."""
    by_class = {c: spec for spec in BACKBONES.values() for c in spec.model_classes}
    for cls in type(unwrap_module(model)).__mro__:
        if cls.__name__ in by_class:
            return by_class[cls.__name__]
    return None


def backbone_for(model: torch.nn.Module) -> BackboneSpec:
    """The registry row for `model`'s class (or a parent class); a clear error for anything else."""
    spec = find_backbone(model)
    if spec is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a supported diffusion transformer. "
            f"Supported: {', '.join(supported_models())}. "
            "Pass the pipeline's transformer (e.g. `pipe.transformer`), not the pipeline."
        )
    return spec


def backbone_named(name: str) -> BackboneSpec:
    """The row called `name`; a clear error naming the registered ones."""
    if name not in BACKBONES:
        raise UnsupportedModelError(f"Unknown backbone {name!r}; choose one of {sorted(BACKBONES)}.")
    return BACKBONES[name]


@dataclass(frozen=True)
class UnitInfo:
    """A cacheable unit found in a model. `block` counts the blocks of all block lists in execution order."""

    index: int
    name: str
    kind: str
    block: int
    module: torch.nn.Module
    runner: str = MODULE
    stream: str = IMAGE


def find_blocks(model: torch.nn.Module):
    """(index over all block lists, index in its list, block, its `BlockList`) of every block of `model`, in
    execution order."""
    index = 0
    for blocks in backbone_for(model).block_lists:
        for b, block in enumerate(getattr(model, blocks.attr)):
            yield index, b, block, blocks
            index += 1


def find_units(model: torch.nn.Module) -> list[UnitInfo]:
    """Every cacheable unit of `model`, in execution order."""
    found = []
    for block_index, b, block, blocks in find_blocks(model):
        for unit in blocks.units:
            module = getattr(block, unit.child, None) if unit.child else block
            if module is not None:
                leaf = unit.name or unit.child
                name = f"{blocks.attr}.{b}.{leaf}" if leaf else f"{blocks.attr}.{b}"
                found.append(UnitInfo(len(found), name, unit.kind, block_index, module, unit.runner, unit.stream))
    return found


def cacheable_units(model: torch.nn.Module) -> list[str]:
    """The ordered unit names of `model`: the columns of a `Schedule` made for it.

    Example:
        >>> cacheable_units(pipe.transformer)[:2]
        ['transformer_blocks.0.attn1', 'transformer_blocks.0.ff']
    """
    return [u.name for u in find_units(model)]


def build_transformer(backbone: str = "dit", size: str = "tiny", **options) -> torch.nn.Module:
    """A randomly initialised transformer of a registered backbone and size, in eval mode (`options`: the
    backbone's `build` arguments, e.g. `seed`, `sample_size`)."""
    return backbone_named(backbone).build(size, **options)


def tiny_pipeline(backbone: str = "dit", **options):
    """The stock pipeline of a registered backbone from tiny random components, built offline."""
    spec = backbone_named(backbone)
    if spec.tiny_pipeline is None:
        raise UnsupportedModelError(f"Backbone {backbone!r} has no stock pipeline to build.")
    return spec.tiny_pipeline(**options)


def example_inputs(model: torch.nn.Module, **options) -> dict:
    """Forward keyword arguments for one random denoising step of `model` (its row's `example_inputs`)."""
    return backbone_for(model).example_inputs(model, **options)


# How a sampling loop calls a model: through its row. Models no row describes get the plain calls: wrappers that take
# their inner model's DiT-style inputs (e.g. a stitched pruned model, `diffsparse.prune.StitchedModel`).


def forward_kwargs(transformer: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, conditions: dict) -> dict:
    """The keywords of `transformer.forward` for latents `x` at timestep `t` (a scalar) with `conditions`."""
    spec = find_backbone(transformer)
    return (spec.forward_kwargs if spec else plain_forward_kwargs)(transformer, x, t, conditions)


def predict(transformer: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, conditions: dict) -> torch.Tensor:
    """The model's prediction (noise or velocity) for latents `x` at timestep `t`, in the shape of `x`."""
    spec = find_backbone(transformer)
    out = transformer(**forward_kwargs(transformer, x, t, conditions)).sample
    return (spec.to_latents if spec else leading_channels)(transformer, out, x)


def set_steps(transformer: torch.nn.Module, scheduler, num_steps: int, x: torch.Tensor) -> None:
    """`scheduler.set_timesteps` as the backbone's stock pipeline calls it."""
    spec = find_backbone(transformer)
    (spec.set_steps if spec else plain_set_steps)(transformer, scheduler, num_steps, x)

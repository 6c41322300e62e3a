"""The backbone registry: what differs between diffusion transformers is a row of data, not a copied forward."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

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
    """A list of transformer blocks of the model (`attr`) and the units of each block, in the order they run."""

    attr: str
    units: tuple[UnitSpec, ...]


def _patch_grid(model: torch.nn.Module, inputs: dict) -> tuple[int, ...]:
    """Token grid (rows, cols) of a patchified image input `(B, C, H, W)`, or (frames, rows, cols) of a video
    input `(B, C, F, H, W)` with a 3-D patch size."""
    x, p = inputs["hidden_states"], model.config.patch_size
    if x.ndim == 5:
        return tuple(n // k for n, k in zip(x.shape[2:], p, strict=True))
    return x.shape[-2] // p, x.shape[-1] // p


def _ids_grid(model: torch.nn.Module, inputs: dict) -> tuple[int, ...] | None:
    """Token grid of packed image tokens from their position ids (`img_ids` (N, 3): _, row, col); None when the
    ids do not form one full grid (e.g. extra reference-image tokens)."""
    ids = inputs.get("img_ids")
    if ids is None:
        return None
    ids = ids[0] if ids.ndim == 3 else ids
    rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    return (rows, cols) if rows * cols == ids.shape[0] else None


@dataclass(frozen=True)
class BackboneSpec:
    """One row of the registry.

    Attributes:
        name: short name used in configs (`dit`, `pixart`, `flux`, `wan`).
        model_classes: diffusers class names this row applies to.
        block_lists: the model's block lists and each block's units, in execution order.
        token_grid: maps `(model, the keyword arguments of model.forward)` to the image token grid ((rows, cols),
            or (frames, rows, cols)), or None if unknown.
        selector_defaults: default selector (`name`) and weights for this backbone (paper Appendix A.5.1).
    """

    name: str
    model_classes: tuple[str, ...]
    block_lists: tuple[BlockList, ...]
    token_grid: Callable[[torch.nn.Module, dict], tuple[int, ...] | None]
    selector_defaults: dict = field(default_factory=dict)

    @property
    def blocks(self) -> str:
        """The attribute of the main block list (the only one for DiT, PixArt and Wan)."""
        return self.block_lists[0].attr


BACKBONES: dict[str, BackboneSpec] = {
    "dit": BackboneSpec(
        name="dit",
        model_classes=("DiTTransformer2DModel",),
        block_lists=(BlockList("transformer_blocks", (UnitSpec("attn1", SELF_ATTN), UnitSpec("ff", MLP))),),
        token_grid=_patch_grid,
        # DiT: lambda_1 = 1, lambda_2 = 0, lambda_3 = 0.25/3, lambda_4 = 0.6, k = 2 (DiffSparse A.5.1, from ToCa).
        selector_defaults=dict(
            name="toca",
            self_attn_weight=1.0,
            cross_attn_weight=0.0,
            reuse_weight=0.25 / 3,
            bonus=0.6,
            bonus_kernel=2,
        ),  # fmt: skip
    ),
    "pixart": BackboneSpec(
        name="pixart",
        model_classes=("PixArtTransformer2DModel",),
        block_lists=(
            BlockList(
                "transformer_blocks",
                (UnitSpec("attn1", SELF_ATTN), UnitSpec("attn2", CROSS_ATTN), UnitSpec("ff", MLP)),
            ),
        ),
        token_grid=_patch_grid,
        # PixArt-alpha: lambda_1 = 0, lambda_2 = 1, lambda_3 = 0.25/3, lambda_4 = 0.4, k = 4 (DiffSparse A.5.1).
        selector_defaults=dict(
            name="toca",
            self_attn_weight=0.0,
            cross_attn_weight=1.0,
            reuse_weight=0.25 / 3,
            bonus=0.4,
            bonus_kernel=4,
        ),  # fmt: skip
    ),
    "flux": BackboneSpec(
        name="flux",
        model_classes=("FluxTransformer2DModel",),
        block_lists=(
            BlockList(
                "transformer_blocks",
                (
                    UnitSpec("attn", JOINT_ATTN, JOINT),
                    UnitSpec("attn", JOINT_ATTN, JOINT, TEXT, name="attn_context"),
                    UnitSpec("ff", MLP),
                    UnitSpec("ff_context", MLP, stream=TEXT),
                ),
            ),
            BlockList("single_transformer_blocks", (UnitSpec("", PARALLEL_BLOCK, SINGLE_STREAM),)),
        ),
        token_grid=_ids_grid,
        # The paper's FLUX weights (lambda_2 = 1: the image queries' entropy over the text) need attention maps of
        # the joint attention, which we do not compute: the default ranks by input norm, with the paper's
        # lambda_3 = 0.25/3, lambda_4 = 0.4 and k = 4.
        selector_defaults=dict(name="norm", reuse_weight=0.25 / 3, bonus=0.4, bonus_kernel=4),
    ),
    "wan": BackboneSpec(
        name="wan",
        model_classes=("WanTransformer3DModel",),
        block_lists=(
            BlockList(
                "blocks",
                (UnitSpec("attn1", SELF_ATTN, ROPE_SELF), UnitSpec("attn2", CROSS_ATTN), UnitSpec("ffn", MLP)),
            ),
        ),
        token_grid=_patch_grid,
        # Wan2.1: a selector without attention maps, so attention stays fused (the paper follows DuCa with value
        # norms; ours is the input norm), with the reuse term and a 2 x 2 spatial bonus in every frame.
        selector_defaults=dict(name="norm", reuse_weight=0.25 / 3, bonus=0.4, bonus_kernel=2),
    ),
}


def supported_models() -> list[str]:
    return [c for spec in BACKBONES.values() for c in spec.model_classes]


def backbone_for(model: torch.nn.Module) -> BackboneSpec:
    """The registry row for `model`'s class (or a parent class); a clear error for anything else."""
    names = {cls.__name__ for cls in type(model).__mro__}
    for spec in BACKBONES.values():
        if names.intersection(spec.model_classes):
            return spec
    raise TypeError(
        f"{type(model).__name__} is not a supported diffusion transformer. "
        f"Supported: {', '.join(supported_models())}. "
        "Pass the pipeline's transformer (e.g. `pipe.transformer`), not the pipeline."
    )


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


def find_units(model: torch.nn.Module) -> list[UnitInfo]:
    """Every cacheable unit of `model`, in execution order."""
    spec = backbone_for(model)
    found, block_index = [], 0
    for blocks in spec.block_lists:
        for b, block in enumerate(getattr(model, blocks.attr)):
            for unit in blocks.units:
                module = getattr(block, unit.child, None) if unit.child else block
                if module is not None:
                    leaf = unit.name or unit.child
                    name = f"{blocks.attr}.{b}.{leaf}" if leaf else f"{blocks.attr}.{b}"
                    found.append(UnitInfo(len(found), name, unit.kind, block_index, module, unit.runner, unit.stream))
            block_index += 1
    return found


def cacheable_units(model: torch.nn.Module) -> list[str]:
    """The ordered unit names of `model`: the columns of a `Schedule` made for it.

    Example:
        >>> cacheable_units(pipe.transformer)[:2]
        ['transformer_blocks.0.attn1', 'transformer_blocks.0.ff']
    """
    return [u.name for u in find_units(model)]

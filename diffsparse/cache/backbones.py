"""The backbone registry: what differs between diffusion transformers is a row of data, not a copied forward."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

SELF_ATTN = "self_attn"
CROSS_ATTN = "cross_attn"
MLP = "mlp"
UNIT_KINDS = (SELF_ATTN, CROSS_ATTN, MLP)


def _patch_grid(model: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[int, int]:
    """Token grid (rows, cols) of a patchified image input `(B, C, H, W)`."""
    p = model.config.patch_size
    return hidden_states.shape[-2] // p, hidden_states.shape[-1] // p


@dataclass(frozen=True)
class BackboneSpec:
    """One row of the registry.

    Attributes:
        name: short name used in configs (`dit`, `pixart`).
        model_classes: diffusers class names this row applies to.
        blocks: attribute of the model holding the list of transformer blocks.
        units: `(child attribute of a block, unit kind)` in the order the block runs them.
        token_grid: maps `(model, hidden_states given to model.forward)` to the image token grid `(rows, cols)`.
        selector_defaults: default selector weights for this backbone (paper Appendix A.5.1).
    """

    name: str
    model_classes: tuple[str, ...]
    blocks: str
    units: tuple[tuple[str, str], ...]
    token_grid: Callable[[torch.nn.Module, torch.Tensor], tuple[int, ...]]
    selector_defaults: dict = field(default_factory=dict)


BACKBONES: dict[str, BackboneSpec] = {
    "dit": BackboneSpec(
        name="dit",
        model_classes=("DiTTransformer2DModel",),
        blocks="transformer_blocks",
        units=(("attn1", SELF_ATTN), ("ff", MLP)),
        token_grid=_patch_grid,
        # DiT: lambda_1 = 1, lambda_2 = 0, lambda_3 = 0.25/3, lambda_4 = 0.6, k = 2 (DiffSparse A.5.1, from ToCa).
        selector_defaults=dict(
            self_attn_weight=1.0, cross_attn_weight=0.0, reuse_weight=0.25 / 3, bonus=0.6, bonus_kernel=2
        ),
    ),
    "pixart": BackboneSpec(
        name="pixart",
        model_classes=("PixArtTransformer2DModel",),
        blocks="transformer_blocks",
        units=(("attn1", SELF_ATTN), ("attn2", CROSS_ATTN), ("ff", MLP)),
        token_grid=_patch_grid,
        # PixArt-alpha: lambda_1 = 0, lambda_2 = 1, lambda_3 = 0.25/3, lambda_4 = 0.4, k = 4 (DiffSparse A.5.1).
        selector_defaults=dict(
            self_attn_weight=0.0, cross_attn_weight=1.0, reuse_weight=0.25 / 3, bonus=0.4, bonus_kernel=4
        ),
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
    """A cacheable unit found in a model."""

    index: int
    name: str
    kind: str
    block: int
    module: torch.nn.Module


def find_units(model: torch.nn.Module) -> list[UnitInfo]:
    """Every cacheable unit of `model`, in execution order."""
    spec = backbone_for(model)
    found = []
    for b, block in enumerate(getattr(model, spec.blocks)):
        for child, kind in spec.units:
            module = getattr(block, child, None)
            if module is not None:
                found.append(UnitInfo(len(found), f"{spec.blocks}.{b}.{child}", kind, b, module))
    return found


def cacheable_units(model: torch.nn.Module) -> list[str]:
    """The ordered unit names of `model`: the columns of a `Schedule` made for it.

    Example:
        >>> cacheable_units(pipe.transformer)[:2]
        ['transformer_blocks.0.attn1', 'transformer_blocks.0.ff']
    """
    return [u.name for u in find_units(model)]

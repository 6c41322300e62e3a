"""Backbones: what differs between DiT, PixArt-alpha, FLUX and Wan2.1, one registry row per file.

A backbone is a row of `registry.BACKBONES`, defined and registered in its own file (`dit.py`, `pixart.py`,
`flux.py`, `wan.py`): its transformer class, its cacheable units and their kinds, its token grid, its default
selector, how a sampling loop calls it, its example inputs, its tiny random builder, its stock pipeline, its latent
shape and its caption encoder. Adding a backbone is one new file that calls `register_backbone`. Importing this
package registers the four. May import: torch, diffusers, transformers, tokenizers, einops; nothing else of
diffsparse (everything else imports it).
"""

from diffsparse.backbones import dit, flux, pixart, wan
from diffsparse.backbones.registry import (
    BACKBONES,
    BackboneSpec,
    BlockList,
    UnitInfo,
    UnitSpec,
    UnsupportedModelError,
    backbone_for,
    backbone_named,
    build_transformer,
    cacheable_units,
    example_inputs,
    find_backbone,
    find_units,
    forward_kwargs,
    predict,
    register_backbone,
    set_steps,
    supported_models,
    tiny_pipeline,
)

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "BlockList",
    "UnitInfo",
    "UnitSpec",
    "UnsupportedModelError",
    "backbone_for",
    "backbone_named",
    "build_transformer",
    "cacheable_units",
    "dit",
    "example_inputs",
    "find_backbone",
    "find_units",
    "flux",
    "forward_kwargs",
    "pixart",
    "predict",
    "register_backbone",
    "set_steps",
    "supported_models",
    "tiny_pipeline",
    "wan",
]

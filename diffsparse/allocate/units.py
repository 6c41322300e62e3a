"""What allocators need to know of a unit from its name alone (a `Schedule`'s or a `MacTable`'s columns): its kind
and its block.

Both come from the backbone registry, not from how a name ends: `<block list>.<i>.<unit>` (as `find_units` names
units) is the `UnitSpec` of that block list and unit in a registry row, so FLUX's joint attention (`...attn`) is a
joint attention and its single-stream blocks (`single_transformer_blocks.<i>`) are parallel blocks numbered after
the dual-stream ones (`UnitInfo.block`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from diffsparse.backbones.registry import BACKBONES


@dataclass(frozen=True)
class UnitPlace:
    """A unit's kind (`backbones.registry.UNIT_KINDS`) and its block over all block lists in execution order."""

    kind: str
    block: int


def _patterns() -> list[tuple[re.Pattern, str, int]]:
    """(name pattern with the block index as group 1, kind, position of the block list in its row) of every unit of
    every registry row."""
    found = []
    for spec in BACKBONES.values():
        for position, blocks in enumerate(spec.block_lists):
            for unit in blocks.units:
                leaf = unit.name or unit.child
                tail = rf"\.{re.escape(leaf)}" if leaf else ""
                found.append((re.compile(rf"{re.escape(blocks.attr)}\.(\d+){tail}"), unit.kind, position))
    return found


def unit_places(units: Sequence[str]) -> list[UnitPlace]:
    """Kind and block of every unit, from the backbone registry (see the module's docstring)."""
    matched = []
    for name in units:
        hits = {(kind, position, int(m.group(1))) for p, kind, position in _patterns() if (m := p.fullmatch(name))}
        if len({(kind, position) for kind, position, _ in hits}) != 1:
            rows = ", ".join(BACKBONES)
            raise ValueError(
                f"Unit {name!r} is not named like a unit of a backbone in the registry ({rows}): use the names of "
                "`cacheable_units(model)`, or group by `all` (no kinds needed)."
                if not hits
                else f"Unit {name!r} has two kinds in the backbone registry: {sorted(hits)}."
            )
        matched.append(hits.pop())
    # blocks of a later block list (FLUX's single-stream ones) come after all blocks of the earlier lists
    sizes: dict[int, int] = {}
    for _, position, index in matched:
        sizes[position] = max(sizes.get(position, 0), index + 1)
    offset = {p: sum(n for q, n in sizes.items() if q < p) for p in sizes}
    return [UnitPlace(kind, offset[position] + index) for kind, position, index in matched]


def unit_kinds(units: Sequence[str]) -> list[str]:
    """The kind of every unit (`backbones.registry.UNIT_KINDS`), from the backbone registry."""
    return [p.kind for p in unit_places(units)]

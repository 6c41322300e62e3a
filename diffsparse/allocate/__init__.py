"""Allocators: ways to spend compute over a trajectory without learning: the hand-made rules (fewer steps, FORA,
ToCa, DuCa, uniform, MosaicDiff's SNR stages) registered by name (`registry`) and fitted to a budget, the exact
budgeted DP (`solver`), Diff-ES's trajectory stage spaces, the searches over them and their fitness. May import
`diffsparse.schedule`, `diffsparse.accounting`, `diffsparse.backbones`, `diffsparse.cache` and `diffsparse.models`.
"""

from diffsparse.allocate import baselines  # noqa: F401  (registers the hand-made rules in `registry.ALLOCATORS`)

"""Stage-wise structural pruning (MosaicDiff, Diff-ES): calibrate per stage, prune heads / neurons / blocks, route.

from diffsparse.prune import PrunePlan, apply_pruning, remove_pruning

plan = PrunePlan.load("outputs/.../pruned")           # from `python train.py experiment=prune_mosaic`
apply_pruning(transformer, plan.store, plan.stage_levels)   # routes each stage's weights in by timestep
...                                                   # sample as usual
remove_pruning(transformer)                           # the dense model again, exactly
"""

from diffsparse.prune.plan import PrunePlan
from diffsparse.prune.routing import (
    StitchedModel,
    WeightRouter,
    apply_pruning,
    pruned_copy,
    pruning_router,
    remove_pruning,
)
from diffsparse.prune.store import PruneStore, build_store

__all__ = [
    "PrunePlan",
    "PruneStore",
    "StitchedModel",
    "WeightRouter",
    "apply_pruning",
    "build_store",
    "pruned_copy",
    "pruning_router",
    "remove_pruning",
]

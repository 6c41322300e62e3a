"""A pruning plan: a store plus one level per stage; its MACs, the preset schedules, and the exported artefact.

- `uniform`: one level for every step (the baseline both papers beat), from a one-stage store calibrated over all
  timesteps.
- `mosaic`: MosaicDiff's three SNR stages with its DiT allocation pattern (appendix Table 2), scaled to the budget.
- searched levels (Diff-ES) come from `diffsparse.prune.task` through the search machinery.

A plan saves as a directory: `plan.json` (levels, stage boundaries, MACs saved, how it was made), `store.safetensors`
(only the stages' used levels), `plan.png`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from diffsparse.accounting.macs import flop_counter
from diffsparse.allocate.baselines import MOSAICDIFF_DIT_BOUNDARIES
from diffsparse.files import atomic_path
from diffsparse.prune.calibration import stage_of_timestep
from diffsparse.prune.routing import WeightRouter
from diffsparse.prune.store import PruneStore

# MosaicDiff's DiT allocation at overall sparsity 0.30 (appendix Table 2): stages in sampling order, noisy first.
MOSAICDIFF_PATTERN = (0.60, 0.04, 0.10)
# Its stage boundaries, in train timesteps (550, 100): see `baselines.MOSAICDIFF_DIT_BOUNDARIES` for the reading.
MOSAICDIFF_BOUNDARIES = MOSAICDIFF_DIT_BOUNDARIES


def routed_macs(model: torch.nn.Module, store: PruneStore, kwargs: dict, routes) -> list[float]:
    """MACs of one forward on `kwargs` with each `(stage, level)` of `routes` routed in (`FlopCounterMode`)."""
    router = WeightRouter(model, store)
    macs = []
    try:
        for stage, level in routes:
            router.route(stage, level)
            with torch.no_grad(), flop_counter() as counter:
                model(**kwargs)
            macs.append(counter.get_total_flops() / 2)
    finally:
        router.restore()
    return macs


def level_macs(model: torch.nn.Module, store: PruneStore, probe: dict) -> list[float]:
    """MACs of one forward on `probe` at every level 0..max_level."""
    return routed_macs(model, store, probe, [(0, level) for level in range(store.max_level + 1)])


def stage_macs(model: torch.nn.Module, plan: PrunePlan, kwargs: dict) -> tuple[float, list[float]]:
    """MACs of one forward on `kwargs`: dense, and at each stage's level of `plan`."""
    dense, *stages = routed_macs(model, plan.store, kwargs, [(0, 0), *enumerate(plan.stage_levels)])
    return dense, stages


def saved_fraction(stage_levels, boundaries, timesteps, macs: list[float]) -> float:
    """Fraction of the dense MACs a plan saves over a sampler's timesteps."""
    stages = stage_of_timestep(timesteps, boundaries)
    used = sum(macs[int(stage_levels[s])] for s in stages)
    return 1.0 - used / (len(stages) * macs[0])


@dataclass
class PrunePlan:
    """A store and the level of each of its stages."""

    store: PruneStore
    stage_levels: list[int]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.stage_levels = [int(x) for x in self.stage_levels]
        if len(self.stage_levels) != self.store.num_stages:
            raise ValueError(f"{len(self.stage_levels)} levels for {self.store.num_stages} stages")
        if min(self.stage_levels) < 0 or max(self.stage_levels) > self.store.max_level:
            raise ValueError(f"levels {self.stage_levels} are outside 0..{self.store.max_level}")

    def compact_store(self) -> PruneStore:
        """The store with only what this plan routes: its stages' orders and the weights of their levels."""
        s = self.store
        weights = {k: w for k, w in s.weights.items() if k[2] == s.removed(k[1], self.stage_levels[k[0]])}
        return replace(s, orders=dict(s.orders), weights=weights, info=dict(s.info))

    def save(self, directory: str | Path, plot: bool = True) -> Path:
        """Write the plan directory. `plan.json` goes last (and an old one first), so a directory with a plan.json
        is always complete."""
        directory = Path(directory)
        (directory / "plan.json").unlink(missing_ok=True)
        self.compact_store().save(directory / "store.safetensors")
        if plot:
            self.plot(directory / "plan.png")
        body = {"stage_levels": self.stage_levels, "method": self.store.method, "levels": self.store.levels,
                "boundaries": self.store.boundaries, **self.meta}  # fmt: skip
        with atomic_path(directory / "plan.json") as tmp:
            tmp.write_text(json.dumps(body, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> PrunePlan:
        directory = Path(directory)
        if not (directory / "plan.json").is_file():
            raise FileNotFoundError(
                f"No pruning plan in {directory} (plan.json): make one with `python train.py experiment=prune_mosaic` "
                "(or prune_uniform / prune_search) and pass its output_dir/pruned."
            )
        body = json.loads((directory / "plan.json").read_text())
        levels = body.pop("stage_levels")
        store = PruneStore.load(directory / "store.safetensors")
        meta = {k: v for k, v in body.items() if k not in ("method", "levels", "boundaries")}
        return cls(store, levels, meta)

    def plot(self, path: str | Path, timesteps=None) -> None:
        """Pruned fraction per sampling step (or per stage), as a bar chart."""
        timesteps = self.meta.get("timesteps") if timesteps is None else timesteps
        levels = np.asarray(self.stage_levels) / self.store.levels
        fig = Figure(figsize=(7, 2.6))
        ax = fig.subplots()
        if timesteps:
            stages = stage_of_timestep(timesteps, self.store.boundaries)
            ax.bar(np.arange(len(stages)), levels[stages], width=1.0, color="tab:red")
            ax.set_xlabel("sampling step (0 = noisiest)")
        else:
            ax.bar(np.arange(len(levels)), levels, color="tab:red")
            ax.set_xlabel("stage")
        unit = "blocks dropped" if self.store.method == "layerdrop" else "heads and neurons removed"
        ax.set_ylabel(f"fraction of {unit}", fontsize=8)
        ax.set_ylim(0, 1)
        saved = self.meta.get("saved_macs")
        ax.set_title(f"{self.store.method}, {self.meta.get('schedule', '')}"
                     + (f": saves {saved:.1%} of MACs" if saved is not None else ""), fontsize=9)  # fmt: skip
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120)


def closest_levels(candidates: list[list[int]], boundaries, timesteps, macs, budget: float) -> list[int]:
    """The candidate whose saved MAC fraction is closest to `budget` (ties: the first)."""
    gaps = [abs(saved_fraction(c, boundaries, timesteps, macs) - budget) for c in candidates]
    return candidates[int(np.argmin(gaps))]


def uniform_levels(store: PruneStore, timesteps, macs, budget: float) -> list[int]:
    """One level for all stages, the one that saves closest to `budget`."""
    candidates = [[lvl] * store.num_stages for lvl in range(store.max_level + 1)]
    return closest_levels(candidates, store.boundaries, timesteps, macs, budget)


def mosaic_levels(store: PruneStore, timesteps, macs, budget: float, pattern=MOSAICDIFF_PATTERN) -> list[int]:
    """MosaicDiff's per-stage pattern times a factor, rounded to levels; the factor that saves closest to `budget`."""
    if store.num_stages != len(pattern):
        raise ValueError(f"the MosaicDiff pattern has {len(pattern)} stages, the store {store.num_stages}")
    candidates = []
    for alpha in np.linspace(0.0, 3.0, 601):
        levels = [min(int(round(alpha * p * store.levels)), store.max_level) for p in pattern]
        if levels not in candidates:
            candidates.append(levels)
    return closest_levels(candidates, store.boundaries, timesteps, macs, budget)

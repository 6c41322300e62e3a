"""The pruning trajectories of every stage, computed once and stored compactly (Diff-ES's weight database).

`build_store` calibrates each stage (`calibration`) and orders its structures (`scores`). For OBS it also keeps the
updated consumer weights after each number of removed structures that some level maps to, in float16, so any
level of any stage can later be routed in without running OBS again. Wanda and LayerDrop store only the order:
their pruned weights are slices of the dense ones. One safetensors file holds it all, with its description in the
file's metadata.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file
from tqdm.auto import tqdm

from diffsparse.files import atomic_path
from diffsparse.prune.calibration import NEEDS, calibration_batches, check_boundaries, collect_statistics
from diffsparse.prune.scores import layerdrop_order, obs_prune, wanda_order
from diffsparse.prune.structures import num_blocks, prunable_layers, removed_count

METHODS = ("obs", "wanda", "layerdrop")
BLOCKS = "blocks"


@dataclass
class PruneStore:
    """Per stage (a train-timestep range), the order in which structures go and, for OBS, the updated weights.

    Attributes:
        method: `obs`, `wanda` or `layerdrop`.
        boundaries: decreasing train timesteps between the stages (`calibration.stage_of_timestep`).
        levels: the level scale: a level l removes the fraction l / levels of every layer's structures (OBS, Wanda)
            or l blocks (LayerDrop, where `levels` is the number of blocks).
        max_level: the highest level stored.
        counts: structures per layer (heads or neurons), by layer name.
        orders: (stage, layer name or "blocks") -> structures in removal order.
        weights: (stage, layer name, removed) -> the consumer weight over the kept columns (OBS only).
        info: how it was made (model, samples, damping, minutes of calibration and pruning).
    """

    method: str
    boundaries: list[int]
    num_train_timesteps: int
    levels: int
    max_level: int
    counts: dict[str, int]
    orders: dict[tuple[int, str], torch.Tensor]
    weights: dict[tuple[int, str, int], torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def num_stages(self) -> int:
        return len(self.boundaries) + 1

    def removed(self, layer: str, level: int) -> int:
        return removed_count(level, self.levels, self.counts[layer])

    def weight_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.weights.values())

    def save(self, path: str | Path) -> Path:
        tensors = {f"order/{s}/{name}": o.contiguous() for (s, name), o in self.orders.items()}
        tensors |= {f"weight/{s}/{name}/{r}": w.contiguous() for (s, name, r), w in self.weights.items()}
        meta = {k: getattr(self, k) for k in ("method", "boundaries", "num_train_timesteps", "levels", "max_level",
                                              "counts", "info")}  # fmt: skip
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"diffsparse_prune_store": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> PruneStore:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No pruning store at {path}: make one with `python train.py experiment=prune_*`.")
        with safe_open(str(path), "pt") as f:
            header = (f.metadata() or {}).get("diffsparse_prune_store")
        if header is None:
            raise ValueError(f"{path} is not a diffsparse pruning store (no diffsparse_prune_store metadata).")
        meta = json.loads(header)
        orders, weights = {}, {}
        for key, value in load_file(str(path)).items():
            kind, stage, *rest = key.split("/")
            if kind == "order":
                orders[(int(stage), rest[0])] = value
            else:
                weights[(int(stage), rest[0], int(rest[1]))] = value
        return cls(orders=orders, weights=weights, **meta)


def build_store(
    ref,
    method: str,
    boundaries: list[int],
    samples: int = 256,
    levels: int = 16,
    max_level: int = 12,
    damp: float = 0.01,
    seed: int = 0,
    batch_size: int = 64,
    dtype: torch.dtype = torch.float16,
) -> PruneStore:
    """Calibrate every stage of `ref`'s model on noised real samples (SNR-aware) and prune it with `method`."""
    num_train = int(ref.noise_schedule.get("num_train_timesteps", 1000))
    boundaries = check_boundaries(boundaries, num_train)
    stages = [calibration_batches(ref, boundaries, k, samples, seed, batch_size) for k in range(len(boundaries) + 1)]
    store = store_from_batches(ref.transformer, method, stages, boundaries, num_train, levels, max_level, damp, dtype)
    store.info.update(samples=samples, seed=seed)
    return store


def store_from_batches(
    model: torch.nn.Module,
    method: str,
    stages: list,
    boundaries: list[int],
    num_train_timesteps: int = 1000,
    levels: int = 16,
    max_level: int = 12,
    damp: float = 0.01,
    dtype: torch.dtype = torch.float16,
) -> PruneStore:
    """Prune `model` with `method` for each stage, calibrated on that stage's batches of forward keywords."""
    if method not in METHODS:
        raise ValueError(f"Unknown pruning method {method!r}; choose one of {METHODS}.")
    layers = prunable_layers(model)
    if method == "layerdrop":
        levels = num_blocks(model)
        max_level = min(max_level, levels)
    if not 0 < max_level <= levels:
        raise ValueError(f"max_level must be in 1..{levels}, got {max_level}")
    counts = {layer.name: layer.count for layer in layers}
    orders, weights = {}, {}
    calibration = pruning = 0.0
    for stage, batches in enumerate(tqdm(stages, desc=f"{method}: stages")):
        start = time.perf_counter()
        stats = collect_statistics(model, batches, NEEDS[method])
        calibration += time.perf_counter() - start
        start = time.perf_counter()
        if method == "layerdrop":
            orders[(stage, BLOCKS)] = layerdrop_order(stats.block_cosine)
        for layer in layers if method != "layerdrop" else []:
            if method == "wanda":
                producers = [p.weight for p in layer.producers]
                orders[(stage, layer.name)] = wanda_order(producers, stats.producer_sq[layer.name], layer.width)
                continue
            needed = sorted({removed_count(level, levels, layer.count) for level in range(max_level + 1)})
            order, kept = obs_prune(layer.consumer.weight, stats.hessians[layer.name], layer.width, needed, damp)
            orders[(stage, layer.name)] = order
            weights.update({(stage, layer.name, r): w.to("cpu", dtype) for r, w in kept.items() if r > 0})
        pruning += time.perf_counter() - start
    info = dict(damp=damp, dtype=str(dtype).removeprefix("torch."), calibration_minutes=calibration / 60,
                pruning_minutes=pruning / 60)  # fmt: skip
    return PruneStore(method, list(boundaries), num_train_timesteps, levels, max_level, counts, orders, weights, info)

"""Running a pruned model: weight routing on one dense backbone (Diff-ES), or stitched copies (MosaicDiff).

`WeightRouter.route(stage, level)` swaps every prunable layer's weights for the thin ones of that stage and level:
producer rows of the kept structures (sliced from the dense weights), the consumer's kept columns (from the store
for OBS, sliced for Wanda), and the attention's head count; for LayerDrop, the block list with the dropped
blocks replaced by a skip. The matmuls really get smaller. `route(stage, 0)` and `restore()` put the dense
parameters back (the same tensor objects). `apply_pruning(model, store, levels)` puts a `WeightRoutingHook` in the
model's diffusers `HookRegistry` (as the token cache does) that routes by timestep before every forward, so the
model switches at the stage boundaries inside any sampling loop; `remove_pruning` gives the original model back.

`pruned_copy` builds the same pruned network physically (new, smaller `nn.Linear` modules on a deep copy);
`StitchedModel` holds one such copy per stage and calls the one for the current timestep, which is MosaicDiff's
way and costs a model's worth of memory per stage.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import torch
from diffusers.hooks import ModelHook
from torch import nn

from diffsparse.backbones.registry import backbone_for
from diffsparse.model_hooks import add_hook, drop_hook, find_hook
from diffsparse.prune.calibration import stage_of_timestep
from diffsparse.prune.store import BLOCKS, PruneStore
from diffsparse.prune.structures import HEADS, PrunableLayer, prunable_layers

_ROUTING_HOOK = "diffsparse_weight_routing"


def kept_structures(store: PruneStore, stage: int, layer: str, level: int) -> tuple[int, torch.Tensor]:
    """(removed count, the kept structures in ascending order) of a layer at a stage and level."""
    removed = store.removed(layer, level)
    keep = torch.ones(store.counts[layer], dtype=torch.bool)
    keep[store.orders[(stage, layer)][:removed].cpu()] = False
    return removed, torch.nonzero(keep).flatten()


def dropped_blocks(store: PruneStore, stage: int, level: int) -> set[int]:
    return set(store.orders[(stage, BLOCKS)][:level].tolist())


class SkippedBlock(nn.Module):
    """A dropped block (LayerDrop): returns its input. The first block keeps its `norm1`, because DiT conditions
    its final layer on `transformer_blocks[0].norm1.emb` whether or not block 0 runs."""

    def __init__(self, block: nn.Module, first: bool = False):
        super().__init__()
        if first and hasattr(block, "norm1"):
            self.norm1 = block.norm1

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _without(blocks: nn.ModuleList, dropped: set[int]) -> nn.ModuleList:
    return nn.ModuleList([SkippedBlock(b, i == 0) if i in dropped else b for i, b in enumerate(blocks)])


def _thin_weights(store, stage, layer: PrunableLayer, level, dense) -> tuple[list, tuple, int]:
    """(producer (weight, bias) pairs, consumer (weight, bias), kept count) of a layer at a stage and level."""
    removed, kept = kept_structures(store, stage, layer.name, level)
    *producers, (cw, cb) = dense
    if removed == 0:
        return producers, (cw, cb), len(kept)
    rows = layer.columns(kept).to(cw.device)
    thin = [(w[rows], None if b is None else b[rows]) for w, b in producers]
    if store.method == "obs":
        key = (stage, layer.name, removed)
        if key not in store.weights:
            raise ValueError(f"Level {level} of stage {stage} is not in this store (a plan's store keeps only its own "
                             "levels): route the full store from build_store.")  # fmt: skip
        consumer = store.weights[key].to(cw.device, cw.dtype)
    else:
        consumer = cw[:, rows]
    return thin, (consumer, cb), len(kept)


def _check(model: nn.Module, store: PruneStore) -> list[PrunableLayer]:
    layers = prunable_layers(model)
    found = {layer.name: layer.count for layer in layers}
    if store.method != "layerdrop" and found != store.counts:
        raise ValueError("This pruning store was made for another model (its layers or their sizes differ).")
    return layers


def _linears(layer: PrunableLayer) -> list[nn.Linear]:
    return [*layer.producers, layer.consumer]


def _weights(layer: PrunableLayer) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) of the producers, then the consumer: the layout `_thin_weights` takes."""
    return [(linear.weight, linear.bias) for linear in _linears(layer)]


def _set_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    linear.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
    linear.out_features, linear.in_features = weight.shape


class WeightRouter:
    """Routes a stage's pruned weights into one dense backbone, in place, and back out."""

    def __init__(self, model: nn.Module, store: PruneStore):
        self.model, self.store = model, store
        self.layers = _check(model, store)
        self.dense = {layer.name: _weights(layer) for layer in self.layers}
        self.heads = {layer.name: layer.count for layer in self.layers if layer.kind == HEADS}
        self.blocks_attr = backbone_for(model).blocks
        self.blocks = getattr(model, self.blocks_attr)
        self.current: tuple[int, int] = (0, 0)

    def route(self, stage: int, level: int) -> None:
        """Make the model the pruned network of `stage` at `level` (level 0: the dense model)."""
        if not 0 <= level <= self.store.max_level or not 0 <= stage < self.store.num_stages:
            raise ValueError(f"stage {stage} / level {level} is not in the store "
                             f"({self.store.num_stages} stages, levels 0..{self.store.max_level})")  # fmt: skip
        if level == 0:
            stage = 0
        if (stage, level) == self.current:
            return
        self.restore()
        self.current = None  # unknown until the route completes
        try:
            if level > 0 and self.store.method == "layerdrop":
                dropped = dropped_blocks(self.store, stage, level)
                setattr(self.model, self.blocks_attr, _without(self.blocks, dropped))
            elif level > 0:
                for layer in self.layers:
                    dense = self.dense[layer.name]
                    producers, consumer, heads = _thin_weights(self.store, stage, layer, level, dense)
                    for linear, (w, b) in zip(layer.producers, producers, strict=True):
                        _set_linear(linear, w, b)
                    _set_linear(layer.consumer, *consumer)
                    if layer.kind == HEADS:
                        layer.module.heads = heads
        except BaseException:
            self.restore()  # never leave a half-routed model behind
            raise
        self.current = (stage, level)

    def restore(self) -> None:
        """The dense parameters (the original tensor objects) back in every layer."""
        setattr(self.model, self.blocks_attr, self.blocks)
        for layer in self.layers:
            for linear, (w, b) in zip(_linears(layer), self.dense[layer.name], strict=True):
                _set_linear(linear, w, b)
            if layer.kind == HEADS:
                layer.module.heads = self.heads[layer.name]
        self.current = (0, 0)


def _timestep(signature: inspect.Signature, module, args, kwargs) -> float:
    t = signature.bind_partial(module, *args, **kwargs).arguments.get("timestep")
    if t is None:
        raise ValueError("A pruned model is routed by timestep: call it with `timestep=`.")
    return float(torch.as_tensor(t).flatten()[0])


class WeightRoutingHook(ModelHook):
    """On the model: before each forward, routes in the weights of the call's stage at its level."""

    def __init__(self, router: WeightRouter, signature: inspect.Signature, stage_levels: list[int]):
        super().__init__()
        self.router, self.signature, self.stage_levels = router, signature, stage_levels
        self.boundaries = router.store.boundaries

    def pre_forward(self, module, *args, **kwargs):
        stage = int(stage_of_timestep(_timestep(self.signature, module, args, kwargs), self.boundaries)[0])
        self.router.route(stage, int(self.stage_levels[stage]))
        return args, kwargs


def pruning_router(model: nn.Module) -> WeightRouter | None:
    """The router of the pruning applied to `model`, or None."""
    hook = find_hook(model, _ROUTING_HOOK)
    return hook.router if hook is not None else None


def apply_pruning(model: nn.Module, store: PruneStore, stage_levels: list[int]) -> WeightRouter:
    """Route `store`'s pruned weights into `model` by timestep: before each forward, the stage of the call's
    timestep picks its level in `stage_levels`. In place; `remove_pruning(model)` undoes it.

    Refused (RuntimeError) when pruning is already applied: `remove_pruning(model)` first.

    Example:
        >>> apply_pruning(transformer, plan.store, plan.stage_levels)
        >>> ...  # sample as usual
        >>> remove_pruning(transformer)
    """
    if len(stage_levels) != store.num_stages:
        raise ValueError(f"{len(stage_levels)} levels for a store of {store.num_stages} stages")
    if pruning_router(model) is not None:
        raise RuntimeError("Pruning is already applied to this model: call remove_pruning(model) first.")
    router = WeightRouter(model, store)
    add_hook(model, WeightRoutingHook(router, inspect.signature(type(model).forward), stage_levels), _ROUTING_HOOK)
    return router


def remove_pruning(model: nn.Module) -> None:
    """The dense model back, exactly (its own parameter tensors), and no routing hook. Without pruning applied it
    only warns (`UserWarning`)."""
    router = pruning_router(model)
    if router is None:
        warnings.warn("No pruning is applied to this model: nothing to remove.", UserWarning, stacklevel=2)
        return
    drop_hook(model, _ROUTING_HOOK)
    router.restore()


def _new_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.requires_grad_(False)


def pruned_copy(model: nn.Module, store: PruneStore, stage: int, level: int) -> nn.Module:
    """A deep copy of `model` physically pruned to `stage` / `level`: smaller `nn.Linear` modules (or fewer blocks)."""
    pruned = copy.deepcopy(model)
    layers = _check(pruned, store)
    if level == 0:
        return pruned
    spec = backbone_for(pruned)
    if store.method == "layerdrop":
        setattr(pruned, spec.blocks, _without(getattr(pruned, spec.blocks), dropped_blocks(store, stage, level)))
        return pruned
    for layer in layers:
        producers, consumer, heads = _thin_weights(store, stage, layer, level, _weights(layer))
        if layer.kind == HEADS:
            attn = layer.module
            attn.to_q, attn.to_k, attn.to_v = (_new_linear(w, b) for w, b in producers)
            attn.to_out[0] = _new_linear(*consumer)
            attn.heads = heads
        else:
            ff = layer.module
            ff.net[0].proj = _new_linear(*producers[0])
            ff.net[2] = _new_linear(*consumer)
    return pruned


class StitchedModel(nn.Module):
    """MosaicDiff's inference: one physically pruned copy per stage, the one for the call's timestep runs."""

    def __init__(self, model: nn.Module, store: PruneStore, stage_levels: list[int]):
        super().__init__()
        if len(stage_levels) != store.num_stages:
            raise ValueError(f"{len(stage_levels)} levels for a store of {store.num_stages} stages")
        self.copies = nn.ModuleList(pruned_copy(model, store, s, lvl) for s, lvl in enumerate(stage_levels))
        self.boundaries = store.boundaries
        self.config = model.config
        self._signature = inspect.signature(type(model).forward)

    def forward(self, *args, **kwargs):
        stage = int(stage_of_timestep(_timestep(self._signature, self.copies[0], args, kwargs), self.boundaries)[0])
        return self.copies[stage](*args, **kwargs)


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each tensor counted once)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total

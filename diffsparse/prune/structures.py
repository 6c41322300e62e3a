"""What structural pruning removes in a diffusion transformer: attention heads and MLP neurons.

Each prunable layer is one unit of the backbone registry (`cache.backbones`): an attention module (self- or
cross-attention) or a feed-forward module. A structure is a group of the *consumer* linear's input columns (the
output projection's `head_dim` columns of one head; one column of the second MLP linear per neuron); the
*producer* rows that compute those inputs (q / k / v rows of the head, the first MLP linear's row of the neuron)
go with it. Second-order pruning updates the consumer; the producers are only sliced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffsparse.backbones.registry import MLP, backbone_for, find_units

HEADS = "heads"
NEURONS = "neurons"


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable unit of a model.

    Attributes:
        name: the unit's name (`transformer_blocks.3.attn1`).
        kind: `heads` or `neurons`.
        block: index of its transformer block.
        module: the attention or feed-forward module.
        producers: linears whose output rows belong to the structures (q, k, v / the first MLP linear).
        consumer: the linear whose input columns belong to the structures (output projection / second MLP linear).
        count: number of structures (heads, or hidden neurons).
        width: consumer columns per structure (head_dim, or 1).
    """

    name: str
    kind: str
    block: int
    module: nn.Module
    producers: tuple[nn.Linear, ...]
    consumer: nn.Linear
    count: int
    width: int

    def columns(self, structures: torch.Tensor) -> torch.Tensor:
        """Consumer column (= producer row) indices of the given structures, in the order given."""
        offsets = torch.arange(self.width)
        return (structures[:, None] * self.width + offsets[None, :]).reshape(-1)


def removed_count(level: int, levels: int, count: int) -> int:
    """How many of `count` structures level `level` of `levels` removes: the nearest whole number to
    `count * level / levels`, at least one structure always kept."""
    return min(int(count * level / levels + 0.5), count - 1)


def _attention_layer(name: str, block: int, attn: nn.Module) -> PrunableLayer:
    consumer = attn.to_out[0]
    heads = attn.heads
    if consumer.in_features % heads or attn.to_q.out_features != consumer.in_features:
        raise NotImplementedError(f"{name}: heads of unequal width are not supported")
    if getattr(attn, "is_cross_attention", False) is False and getattr(attn, "add_q_proj", None) is not None:
        raise NotImplementedError(f"{name}: joint (dual-stream) attention is not supported for pruning yet")
    producers = (attn.to_q, attn.to_k, attn.to_v)
    return PrunableLayer(name, HEADS, block, attn, producers, consumer, heads, consumer.in_features // heads)


def _mlp_layer(name: str, block: int, ff: nn.Module) -> PrunableLayer:
    first, consumer = ff.net[0], ff.net[2]
    proj = getattr(first, "proj", None)
    if not isinstance(proj, nn.Linear) or proj.out_features != consumer.in_features:
        raise NotImplementedError(f"{name}: only GELU feed-forwards (one up-projection) can be pruned, not gated ones")
    return PrunableLayer(name, NEURONS, block, ff, (proj,), consumer, consumer.in_features, 1)


def prunable_layers(model: nn.Module) -> list[PrunableLayer]:
    """Every prunable layer of `model`, in execution order (the registry's units)."""
    if not backbone_for(model).prunable:  # a clear error for models whose blocks pruning does not cover
        raise NotImplementedError(
            f"Structural pruning covers DiT and PixArt-alpha; {type(model).__name__} is token-cache only for now."
        )
    return [
        _mlp_layer(u.name, u.block, u.module) if u.kind == MLP else _attention_layer(u.name, u.block, u.module)
        for u in find_units(model)
    ]


def num_blocks(model: nn.Module) -> int:
    return len(getattr(model, backbone_for(model).blocks))

"""Pruning orders: structured second-order pruning (OBS) with weight updates, structural Wanda, LayerDrop.

Structured OBS (as in MosaicDiff and Diff-ES section 3.3, after OBC / ZipLM): for a linear `W` (out x in) whose
inputs `X` have the Hessian `H = X^T X`, removing the input columns `Q` of one structure costs

    e(Q) = sum over output rows of  w_Q^T [(H^-1)_QQ]^-1 w_Q

and the best update of the remaining weights is `W -= W[:, Q] [(H^-1)_QQ]^-1 (H^-1)_Q,:`, after which `H^-1`
loses `Q` the same way. Structures are removed greedily, cheapest first. Everything runs in float64.

Structural Wanda and LayerDrop (Diff-ES appendix D) give an order without updates: Wanda averages
`|W_ij| * ||X_j||` over a structure's producer rows, LayerDrop drops the blocks whose output is most similar to
their input (cosine, averaged over the calibration tokens).
"""

from __future__ import annotations

import torch


def damped_inverse(hessian: torch.Tensor, damp: float = 0.01, attempts: int = 6) -> torch.Tensor:
    """`(H + damp * mean(diag H) * I)^-1` by Cholesky; if that fails, the damping grows tenfold (up to
    `attempts` times), then a pseudo-inverse is used."""
    h = hessian.double()
    eye = torch.eye(len(h), dtype=h.dtype, device=h.device)
    scale = float(h.diagonal().mean()) or 1.0
    for i in range(attempts):
        chol, info = torch.linalg.cholesky_ex(h + damp * 10**i * scale * eye)
        if int(info) == 0:
            return torch.cholesky_inverse(chol)
    return torch.linalg.pinv(h + damp * scale * eye, hermitian=True)


def obs_prune(
    weight: torch.Tensor, hessian: torch.Tensor, width: int, counts: list[int], damp: float = 0.01
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Greedy structured OBS on the input columns of `weight`, in groups of `width` columns.

    Args:
        weight: (out, in) weight of the consumer linear.
        hessian: (in, in) `X^T X` of its calibration inputs.
        width: columns per structure (`in` must be a multiple).
        counts: numbers of removed structures to keep the weights of.

    Returns:
        (order, weights): the structures in the order they were removed (the first `max(counts)`; the rest follow
        in index order), and for each
        count the updated weight restricted to the kept columns (out x kept*width, columns in ascending order).
    """
    w = weight.double().clone()
    hinv = damped_inverse(hessian, damp)
    groups = torch.arange(w.shape[1], device=w.device).reshape(-1, width)
    alive = torch.ones(len(groups), dtype=torch.bool, device=w.device)
    order: list[int] = []
    kept = {}
    if 0 in counts:
        kept[0] = w.clone()
    for step in range(1, max(counts, default=0) + 1):
        idx = torch.nonzero(alive).flatten()
        cols = groups[idx]  # (G, width)
        block = hinv[cols[:, :, None], cols[:, None, :]]  # (G, width, width)
        block_inv = torch.linalg.inv(block)
        wq = w[:, cols]  # (out, G, width)
        saliency = torch.einsum("ogw,gwv,ogv->g", wq, block_inv, wq)
        best = int(torch.argmin(saliency))
        g, q, inv_q = int(idx[best]), cols[best], block_inv[best]
        w -= w[:, q] @ inv_q @ hinv[q, :]
        hinv -= hinv[:, q] @ inv_q @ hinv[q, :]
        w[:, q] = 0.0
        alive[g] = False
        order.append(g)
        if step in counts:
            kept[step] = w[:, groups[alive].reshape(-1)].clone()
    order += torch.nonzero(alive).flatten().tolist()
    return torch.tensor(order, dtype=torch.long), kept  # the order on the CPU, the weights where `weight` was


def wanda_order(producers: list[torch.Tensor], input_sq_means: list[torch.Tensor], width: int) -> torch.Tensor:
    """Structures ordered from least to most important by structural Wanda: the mean of `|W_ij| * ||X_j||` over
    the structure's rows of every producer (`input_sq_means`: the producer's per-feature mean squared input, so
    producers fed by different numbers of tokens, such as cross-attention's keys, weigh alike)."""
    score = 0.0
    for w, sq in zip(producers, input_sq_means, strict=True):
        element = w.double().abs() * sq.to(w.device).double().clamp_min(0).sqrt()[None, :]  # (rows, in)
        score = score + element.reshape(-1, width, element.shape[1]).mean(dim=(1, 2))
    return torch.argsort(torch.as_tensor(score), stable=True).cpu()


def layerdrop_order(cosine: torch.Tensor) -> torch.Tensor:
    """Blocks ordered from the one closest to identity (highest input/output cosine similarity) to the least."""
    return torch.argsort(-cosine.double(), stable=True)

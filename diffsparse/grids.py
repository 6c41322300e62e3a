"""Sample grids people can read: each sample scaled up (nearest neighbour) to at least `min_pixels` a side, rows and
columns labelled (method, class or caption)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from matplotlib.figure import Figure

from diffsparse.files import atomic_path


def labelled_grid(
    images: torch.Tensor,
    path: str | Path,
    columns: list[str],
    rows: list[str] | None = None,
    title: str | None = None,
    min_pixels: int = 64,
) -> Path:
    """Save `images` (N, C, H, W) in [0, 1], row-major, as a PNG grid of `len(columns)` columns with a label over
    each column and, if given, one left of each row. Samples are scaled up by a whole factor to at least
    `min_pixels` pixels a side, so that 16-pixel digits can be judged by eye."""
    n, ncol = len(images), len(columns)
    if n == 0 or ncol == 0:
        raise ValueError("labelled_grid needs at least one image and one column.")
    nrow = math.ceil(n / ncol)
    if rows is not None and len(rows) != nrow:
        raise ValueError(f"{n} images in {ncol} columns make {nrow} rows, but {len(rows)} row labels were given.")
    scale = max(1, math.ceil(min_pixels / min(images.shape[-2:])))
    x = torch.nn.functional.interpolate(images.float().clamp(0, 1), scale_factor=scale, mode="nearest")
    side = x.shape[-1] / 100  # inches per sample at 100 dpi: one image pixel per screen pixel
    fig = Figure(figsize=(ncol * side * 1.08 + (1.6 if rows else 0.2), nrow * side * 1.08 + (0.6 if title else 0.35)))
    axes = fig.subplots(nrow, ncol, squeeze=False)  # no pyplot: no backend or global figure state
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([]), ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if i < n:
            img = x[i].permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        if i < ncol:
            ax.set_title(columns[i], fontsize=9)
        if rows is not None and i % ncol == 0:
            ax.set_ylabel(rows[i // ncol], rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(pad=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)

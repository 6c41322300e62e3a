"""scikit-learn's bundled handwritten digits (1,797 images of 8 x 8, 10 classes) as small images in [-1, 1].

The data ships inside scikit-learn, so the reference model and its feature network train with no download.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits as sk_load_digits

NUM_CLASSES = 10
IMAGE_SIZE = 16


def load_digits(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as `(images (N, 1, size, size) in [-1, 1], labels (N,))`, bilinearly upsampled from 8 x 8."""
    data = sk_load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # values 0..16 -> [0, 1]
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1, torch.tensor(data.target, dtype=torch.long)


def split(labels: torch.Tensor, held_out: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified train / held-out indices: the same `held_out` fraction of every class, fixed by `seed`."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = round(held_out * len(idx))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> [0, 1] for metrics and image files."""
    return (images.clamp(-1, 1) + 1) / 2

"""Quality metrics with their uncertainty: distance to real data (FD, class accuracy on the feature network) and
fidelity to the dense model's samples from the same noise (PSNR, SSIM, LPIPS where its weights are present).

Images are (B, C, H, W) in [0, 1]. Every number comes with a 95 % bootstrap interval over the samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Estimate:
    """A value and its 95 % bootstrap interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets `a` (N, D) and `b` (M, D), in float64.

    ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)); the last trace is the sum of the square roots
    of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), which is symmetric, so no complex matrix roots are needed.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def l2(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error of `x` against `ref`, both in [0, 1] (the mean over samples is the L2 loss
    that schedules are trained on, up to the factor 4 of the [-1, 1] range)."""
    return (x.double() - ref.double()).pow(2).flatten(1).mean(1)


def psnr(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR in dB of `x` against `ref`, both in [0, 1]; capped at 100 dB (identical images)."""
    mse = (x.double() - ref.double()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def ssim(x: torch.Tensor, ref: torch.Tensor, kernel_size: int = 7) -> torch.Tensor:
    """Per-sample SSIM (torchmetrics, Gaussian window of `kernel_size`, sigma 1.5; 7 fits 16 px images)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(
        x.double(), ref.double(), data_range=1.0, kernel_size=kernel_size, reduction="none"
    )


def lpips_metric(net: str = "alex") -> Callable | None:
    """Per-sample LPIPS (images upsampled to 64 px), or None when its backbone weights are not on this machine.

    lpips downloads torchvision's ImageNet backbone on first use; offline, put the file in torch's hub
    checkpoint folder (`torch.hub.get_dir()/checkpoints`) to enable this column.
    """
    files = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth", "squeeze": "squeezenet1_1-b8a52dc0.pth"}
    path = Path(torch.hub.get_dir()) / "checkpoints" / files[net]
    if not path.is_file():
        log.info("LPIPS skipped: backbone weights not found at %s", path)
        return None
    import lpips

    model = lpips.LPIPS(net=net, verbose=False).eval()

    def distance(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        def prep(im):
            im = im.expand(-1, 3, -1, -1) if im.shape[1] == 1 else im
            return torch.nn.functional.interpolate(im.float(), size=64, mode="bilinear") * 2 - 1

        with torch.no_grad():
            return model(prep(x), prep(ref)).flatten()

    return distance


def bootstrap(
    statistic: Callable[[np.ndarray], float], num: int, rounds: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile interval of `statistic(indices)` over `rounds` resamples of `num` items with replacement."""
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, num, num)) for _ in range(rounds)]
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def mean_estimate(values: torch.Tensor | np.ndarray, rounds: int = 1000, seed: int = 0) -> Estimate:
    """Mean of per-sample values with its bootstrap interval."""
    v = np.asarray(values, dtype=np.float64)
    low, high = bootstrap(lambda i: float(v[i].mean()), len(v), rounds, seed)
    return Estimate(float(v.mean()), low, high)


def fd_estimate(features: np.ndarray, reference: np.ndarray, rounds: int = 200, seed: int = 0) -> Estimate:
    """FD of generated `features` to `reference` features, with a normal bootstrap interval (FD +- 1.96 sd).

    Resampling with replacement repeats samples, which shrinks their covariance and shifts every resampled FD
    upwards (at a few dozen samples, all of them lie above the full-sample FD); so the interval takes only the
    spread of the resampled FDs, centred on the estimate, rather than their percentiles.
    """
    value = frechet_distance(features, reference)
    rng = np.random.default_rng(seed)
    n = len(features)
    spread = np.std([frechet_distance(features[rng.integers(0, n, n)], reference) for _ in range(rounds)])
    return Estimate(value, max(value - 1.96 * spread, 0.0), value + 1.96 * spread)


def paired_difference(
    statistic: Callable[[np.ndarray], float], num: int, rounds: int = 1000, seed: int = 0, normal: bool = False
) -> Estimate:
    """`statistic(indices)` on all `num` items, for a statistic that is a difference between two methods on the
    same samples (same noise, same condition), with a paired bootstrap interval: both methods are resampled with
    the same indices, so what the samples share cancels and a small but consistent difference shows.

    `normal`: estimate +- 1.96 sd of the resampled values instead of their percentiles (for FD, see
    `fd_estimate`).
    """
    value = statistic(np.arange(num))
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, num, num)) for _ in range(rounds)])
    if normal:
        spread = 1.96 * values.std()
        return Estimate(value, value - spread, value + spread)
    low, high = np.percentile(values, [2.5, 97.5])
    return Estimate(value, float(low), float(high))

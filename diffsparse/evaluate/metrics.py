"""Quality metrics with their uncertainty: distance to real data (FD, class accuracy on the feature network) and
fidelity to the dense model's samples from the same noise (PSNR, SSIM, LPIPS where its weights are present).

Images are (B, C, H, W) in [0, 1]. Every number comes with a 95 % bootstrap interval over the samples
(`scipy.stats.bootstrap`, percentile intervals).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.stats
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from diffsparse.learn.losses import LpipsWeightsMissing, lpips_network

log = logging.getLogger(__name__)

# PSNR of identical images (and of any pair closer than MSE 1e-10): the mean over samples stays finite.
PSNR_CAP = 100.0


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
    """Per-sample PSNR in dB of `x` against `ref`, both in [0, 1], capped at `PSNR_CAP` (100 dB: identical images).

    The project's one PSNR: tables, search fitness and `python infer.py` report the mean of these values. Not
    torchmetrics' `peak_signal_noise_ratio`: it scales by 10 / ln 10 in float32 (values off by ~1e-6 dB) and gives
    inf for identical images; this is its formula in float64 with the cap.
    """
    mse = (x.double() - ref.double()).pow(2).flatten(1).mean(1).clamp_min(10 ** (-PSNR_CAP / 10))
    return 10 * torch.log10(1.0 / mse)


def ssim(x: torch.Tensor, ref: torch.Tensor, kernel_size: int = 7) -> torch.Tensor:
    """Per-sample SSIM (torchmetrics, Gaussian window of `kernel_size`, sigma 1.5; 7 fits 16 px images)."""
    return structural_similarity_index_measure(
        x.double(), ref.double(), data_range=1.0, kernel_size=kernel_size, reduction="none"
    )


def lpips_metric(net: str = "alex", required: bool = False) -> Callable | None:
    """Per-sample LPIPS (images resized to 64 px) on the network of `learn.losses.lpips_network`, or None when its
    backbone weights are not on this machine (`required`: raise `LpipsWeightsMissing`, which says what to do).

    lpips downloads torchvision's ImageNet backbone on first use; offline, put the file in torch's hub
    checkpoint folder (`torch.hub.get_dir()/checkpoints`) to enable this column.
    """
    try:
        model = lpips_network(net)
    except LpipsWeightsMissing as e:
        if required:
            raise
        log.info("LPIPS skipped: %s", e)
        return None

    def distance(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        def prep(im):
            im = im.expand(-1, 3, -1, -1) if im.shape[1] == 1 else im
            return torch.nn.functional.interpolate(im.float(), size=64, mode="bilinear") * 2 - 1

        with torch.no_grad():
            return model(prep(x), prep(ref)).flatten()

    return distance


def _scipy_bootstrap(statistic: Callable[[np.ndarray], float], num: int, rounds: int, seed: int):
    return scipy.stats.bootstrap((np.arange(num),), statistic, n_resamples=rounds, vectorized=False,
                                 method="percentile", rng=np.random.default_rng(seed))  # fmt: skip


def resampled(statistic: Callable[[np.ndarray], float], num: int, rounds: int = 1000, seed: int = 0) -> np.ndarray:
    """`statistic(indices)` on `rounds` resamples of `num` items with replacement: `scipy.stats.bootstrap`'s
    bootstrap distribution (round r draws `np.random.default_rng(seed).integers(0, num, num)`, in turn).

    Statistics take indices rather than data so that paired statistics (two methods on the same samples) and
    feature-set statistics (FD) resample as one; a single item has nothing to resample and gives its own value.
    """
    if num < 2:
        return np.full(rounds, statistic(np.zeros(num, dtype=np.int64)), dtype=np.float64)
    return np.asarray(_scipy_bootstrap(statistic, num, rounds, seed).bootstrap_distribution, dtype=np.float64)


def bootstrap(
    statistic: Callable[[np.ndarray], float], num: int, rounds: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile interval of `statistic(indices)` over `rounds` resamples of `num` items with replacement
    (`scipy.stats.bootstrap`, method `percentile`)."""
    if num < 2:
        value = float(statistic(np.zeros(num, dtype=np.int64)))
        return value, value
    interval = _scipy_bootstrap(statistic, num, rounds, seed).confidence_interval
    return float(interval.low), float(interval.high)


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
    spread = np.std(resampled(lambda i: frechet_distance(features[i], reference), len(features), rounds, seed))
    return Estimate(value, max(value - 1.96 * spread, 0.0), value + 1.96 * spread)


def paired_difference(
    statistic: Callable[[np.ndarray], float], num: int, rounds: int = 1000, seed: int = 0, normal: bool = False
) -> Estimate:
    """`statistic(indices)` on all `num` items, for a statistic that is a difference between two methods on the
    same samples (same noise, same condition), with a paired bootstrap interval: both methods are resampled with
    the same indices, so what the samples share cancels and a small but consistent difference shows.

    `normal`: estimate +- 1.96 sd of the resampled values instead of their percentiles (for FD, see
    `fd_estimate`; none of `scipy.stats.bootstrap`'s methods is this one, so its distribution is used directly).
    """
    value = statistic(np.arange(num))
    if normal:
        spread = 1.96 * resampled(statistic, num, rounds, seed).std()
        return Estimate(value, value - spread, value + spread)
    return Estimate(value, *bootstrap(statistic, num, rounds, seed))

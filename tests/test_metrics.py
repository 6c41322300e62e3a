"""Quality metrics: FD against a direct matrix square root, PSNR / SSIM edge cases, bootstrap intervals."""

import numpy as np
import pytest
import scipy.linalg
import torch

from diffsparse.evaluate.inference import compare_with_dense
from diffsparse.evaluate.metrics import (
    PSNR_CAP,
    bootstrap,
    fd_estimate,
    frechet_distance,
    mean_estimate,
    psnr,
    resampled,
    ssim,
)


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6))
    b = rng.normal(size=(250, 6)) @ rng.normal(size=(6, 6)) + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_fd_interval_brackets_the_estimate_and_shrinks_with_samples():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(2000, 4))
    small = fd_estimate(rng.normal(size=(100, 4)) + 0.3, ref, rounds=100)
    large = fd_estimate(rng.normal(size=(1000, 4)) + 0.3, ref, rounds=100)
    for e in (small, large):
        assert e.low <= e.value <= e.high
    assert large.high - large.low < small.high - small.low


def test_psnr_and_ssim():
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.all(psnr(x, x) == 100.0)
    assert torch.allclose(ssim(x, x), torch.ones(4, dtype=torch.float64))
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert torch.all(psnr(noisy, x) < 30) and torch.all(psnr(noisy, x) > 15)
    assert torch.all(ssim(noisy, x) < 1)


def test_bootstrap_interval_covers_the_mean_of_normal_data():
    values = np.random.default_rng(2).normal(loc=3.0, size=400)
    e = mean_estimate(values, rounds=500)
    assert e.low < 3.0 < e.high
    assert e.high - e.low == pytest.approx(2 * 1.96 / 20, rel=0.25)
    assert bootstrap(lambda i: 1.0, 10, rounds=5) == (1.0, 1.0)


def test_scipy_resamples_the_indices_the_former_loop_drew():
    v = np.random.default_rng(3).normal(size=37)
    rng = np.random.default_rng(0)
    by_hand = [float(v[rng.integers(0, 37, 37)].mean()) for _ in range(200)]
    assert np.array_equal(resampled(lambda i: float(v[i].mean()), 37, 200, seed=0), by_hand)


def test_infer_reports_the_evaluation_s_psnr():
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    noisy = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    noisy[0] = x[0]  # one identical image: capped, so the mean stays finite
    result = compare_with_dense(lambda: x, lambda: noisy, rounds=1)
    assert result["psnr_vs_dense"] == float(psnr(noisy, x).mean()) < PSNR_CAP
    assert compare_with_dense(lambda: x, lambda: x.clone(), rounds=1)["psnr_vs_dense"] == PSNR_CAP

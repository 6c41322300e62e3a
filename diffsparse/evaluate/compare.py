"""Comparing the rows of an evaluation: each row's saving against the budget (`budget_check`) and paired
differences against one row (`add_paired_differences`: ΔFD, ΔL2, ΔPSNR with paired bootstrap intervals)."""

from __future__ import annotations

import logging

import numpy as np

from diffsparse.evaluate.cli import EvalConfig
from diffsparse.evaluate.metrics import frechet_distance, paired_difference

log = logging.getLogger("diffsparse.evaluate.harness")  # the harness's log: its warnings read as the harness's


def budget_check(rows: list[dict], dense_macs: float, cfg: EvalConfig) -> list[tuple[float, bool]]:
    """Each row's measured fraction of dense MACs saved, and whether it is further than `cfg.budget_tolerance`
    from the budget (logged: such a row is not compared at the budget). A time budget (`--budget-unit time`) is
    not a MAC saving: no row is flagged."""
    checked = []
    for row in rows:
        saved = 1.0 - row["gmacs_per_image"] / dense_macs
        off = cfg.budget_unit == "macs" and row["method"] != "dense" and abs(saved - cfg.budget) > cfg.budget_tolerance
        if off:
            log.warning("%s saves %.1f%% of the dense MACs, off the %.0f%% budget by more than %.0f%% (flagged %s)",
                        row["method"], 100 * saved, 100 * cfg.budget, 100 * cfg.budget_tolerance, "⚠")  # fmt: skip
        checked.append((saved, off))
    return checked


def add_paired_differences(rows, features_of: dict, per_sample: dict, real_features, cfg: EvalConfig) -> None:
    """Columns `dfd` (with a feature network), `dl2` and `dpsnr`: each row's FD, L2 and PSNR minus those of
    `cfg.compare_to`, on the same samples, with paired bootstrap intervals (for FD and L2 an interval below 0,
    for PSNR one above 0, means: better than that row, beyond sampling noise).

    `features_of`: row name -> features; `per_sample`: row name -> {"l2": ..., "psnr": ...} per-sample values
    against dense (dense itself has none, so it gets no `dl2` / `dpsnr`)."""
    base = cfg.compare_to
    for row in rows:
        name = row["method"]
        if name == base:
            continue
        if name in features_of and base in features_of:
            a, b = features_of[name], features_of[base]

            def dfd(i, a=a, b=b):
                return frechet_distance(a[i], real_features) - frechet_distance(b[i], real_features)

            rounds = max(cfg.bootstrap_rounds // 5, 20)
            row["dfd"] = paired_difference(dfd, len(a), rounds, cfg.seed, normal=True)
        for column, key in (("dl2", "l2"), ("dpsnr", "psnr")):
            if key in per_sample.get(name, {}) and key in per_sample.get(base, {}):
                row[column] = mean_difference(per_sample[name][key], per_sample[base][key], cfg.bootstrap_rounds,
                                              cfg.seed)  # fmt: skip


def mean_difference(a: np.ndarray, b: np.ndarray, rounds: int = 1000, seed: int = 0):
    """Mean of the per-sample differences `a - b` (two rows on the same samples), with a paired bootstrap interval
    (`metrics.paired_difference`)."""
    return paired_difference(lambda i: float((a[i] - b[i]).mean()), len(a), rounds, seed)

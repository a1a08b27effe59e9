"""Metrics pinned against hand-computed values, and AUC / C-index cross-checked against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from training.metrics import (
    brier,
    calibration_table,
    concordance_index,
    interval_coverage,
    lift_by_decile,
    log_loss,
    roc_auc,
)


def test_roc_auc_hand_values() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    # a tie between a positive and a negative counts one half: (0.5 + 1 + 1 + 1) / 4
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == 0.875
    assert roc_auc([1, 0], [0.3, 0.3]) == 0.5


def test_roc_auc_matches_sklearn() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    s = np.round(rng.normal(y * 0.7, 1.0), 1)  # rounding makes many ties
    assert roc_auc(y, s) == pytest.approx(sklearn_metrics.roc_auc_score(y, s), abs=1e-12)


def test_roc_auc_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"must be 0/1; position 1 is 2\.0"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="shape"):
        roc_auc([0, 1], [0.1])


def test_log_loss_and_brier() -> None:
    assert log_loss([1, 0], [0.8, 0.4]) == pytest.approx(-(np.log(0.8) + np.log(0.6)) / 2)
    assert log_loss([1, 0], [0.8, 0.4]) == pytest.approx(0.3669845, abs=1e-7)
    assert np.isfinite(log_loss([1], [0.0]))  # clipped, not infinite
    assert brier([1, 0], [0.8, 0.4]) == pytest.approx(0.1)


def test_calibration_table() -> None:
    t = calibration_table([0, 0, 1, 1], [0.05, 0.15, 0.12, 1.0], bins=10)
    assert t["count"].tolist() == [1, 2, 1]
    assert t["lower"].tolist() == pytest.approx([0.0, 0.1, 0.9])
    assert t["mean_predicted"].tolist() == pytest.approx([0.05, 0.135, 1.0])
    assert t["observed_rate"].tolist() == [0.0, 0.5, 1.0]
    assert t["gap"].tolist() == pytest.approx([-0.05, 0.365, 0.0])


def test_lift_by_decile() -> None:
    y = [1, 1, 0, 1, 0, 0, 0, 0, 0, 0]
    s = np.arange(10, 0, -1)
    t = lift_by_decile(y, s, n_bins=5)
    assert t["count"].tolist() == [2] * 5
    assert t["positives"].tolist() == [2, 1, 0, 0, 0]
    assert t["lift"].tolist() == pytest.approx([1 / 0.3, 0.5 / 0.3, 0, 0, 0])
    assert t["cum_capture"].tolist() == pytest.approx([2 / 3, 1, 1, 1, 1])


def test_interval_coverage() -> None:
    assert interval_coverage([1, 2, 3, 4], [0, 2.5, 3, 5], [1, 3, 4, 6]) == 0.5
    with pytest.raises(ValueError, match="lower > upper"):
        interval_coverage([1], [2], [1])


def test_concordance_hand_values() -> None:
    d, e = [1, 2, 3, 4], [1, 1, 0, 1]
    # comparable: (0,1) (0,2) (0,3) (1,2) (1,3); only (1,2) is discordant
    assert concordance_index(d, [1, 3, 2, 4], e) == pytest.approx(0.8)
    # a tied prediction counts one half
    assert concordance_index(d, [1, 3, 3, 4], e) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="no comparable pairs"):
        concordance_index([1, 2], [1, 2], [0, 0])


def _brute_c(d: np.ndarray, p: np.ndarray, e: np.ndarray) -> float:
    num = den = 0.0
    for i in range(len(d)):
        if not e[i]:
            continue
        for j in range(len(d)):
            if d[i] < d[j]:
                den += 1
                num += 1.0 if p[i] < p[j] else 0.5 if p[i] == p[j] else 0.0
    return num / den


def test_concordance_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    d = rng.integers(1, 30, 300).astype(float)  # tied durations
    p = np.round(d + rng.normal(0, 8, 300))  # tied predictions
    e = rng.random(300) < 0.6
    assert concordance_index(d, p, e) == pytest.approx(_brute_c(d, p, e), abs=1e-12)

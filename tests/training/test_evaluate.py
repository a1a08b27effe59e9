"""Backtest metrics and baselines, by hand on tiny tables and against known answers."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pytest

from features.contract import C, F
from training.evaluate import (
    _quantile_days,
    bg_nbd_at,
    churn_baselines,
    next_purchase_baselines,
    next_purchase_metrics,
    value_baselines,
    value_metrics,
)
from training.next_purchase import NP


def _forecast(expected, lower, upper, p7, p30) -> pd.DataFrame:
    return pd.DataFrame({NP.EXPECTED_DAYS: expected, NP.LOWER_DAYS: lower, NP.UPPER_DAYS: upper,
                         NP.P_7D: p7, NP.P_30D: p30})


def test_next_purchase_metrics_count_only_rows_whose_outcome_is_known() -> None:
    # rows: event inside; event outside; censored past upper (a known miss); censored before upper
    # (unknown: left out); censored past lower with an open upper (a known hit)
    duration = [10.0, 50.0, 40.0, 5.0, 60.0]
    event = [True, True, False, False, False]
    pred = _forecast([12, 20, 15, 10, np.nan], [5, 10, 5, 2, 30], [20, 30, 30, 20, np.nan],
                     [0.2, 0.1, 0.1, 0.3, 0.0], [0.9, 0.5, 0.5, 0.6, 0.1])
    m = next_purchase_metrics(duration, event, pred)
    assert m["coverage_rows"] == 4
    assert m["coverage"] == pytest.approx(2 / 4)
    # P(within 30 d) is judged on rows followed up 30 days or with an event: all but the 5-day censored one
    # outcomes: 1 (10 d), 0 (50 d), 0 (censored at 40), 0 (censored at 60) -> only the first is positive
    assert m["rate_30d"] == pytest.approx(1 / 4)
    assert m["auc_30d"] == pytest.approx(1.0)
    assert m["mae_days"] == pytest.approx((abs(12 - 10) + abs(20 - 50)) / 2)
    assert m["c_index"] > 0.5


def test_value_metrics_by_hand() -> None:
    y = np.array([0.0, 10.0, 30.0, 60.0])
    m = value_metrics(y, y)
    assert m["rmse"] == 0.0 and m["gini"] == pytest.approx(1.0) and m["total_ratio"] == pytest.approx(1.0)
    flat = value_metrics(y, np.full(4, 25.0))
    assert flat["rmse"] == pytest.approx(np.sqrt(np.mean((y - 25.0) ** 2)))
    assert flat["total_ratio"] == pytest.approx(1.0)
    backwards = value_metrics(y, y[::-1])
    assert backwards["gini"] < 0 < m["gini"]
    with pytest.raises(ValueError, match="NaN"):
        value_metrics(y, np.array([1.0, np.nan, 2.0, 3.0]))


def test_quantile_days_interpolates_inside_a_step() -> None:
    grid = np.array([7.0, 14.0, 30.0])
    cdf = np.array([[0.2, 0.6, 0.9], [0.05, 0.1, 0.2]])
    med = _quantile_days(cdf, grid, 0.5)
    assert med[0] == pytest.approx(7 + (0.5 - 0.2) / (0.6 - 0.2) * 7)
    assert np.isnan(med[1])  # never reaches one half within the grid
    assert _quantile_days(cdf, grid, 0.1)[0] == pytest.approx(0.1 / 0.2 * 7)


def _poisson_history(n: int, seed: int = 3) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Members buying as Poisson processes with gamma rates over 2023 (one line per order)."""
    rng = np.random.default_rng(seed)
    rates = rng.gamma(0.8, 1 / 20, n)  # purchases a day
    rows = []
    for m, lam in enumerate(rates):
        t = rng.uniform(0, 30)
        while t < 365:
            rows.append((f"M{m:05d}", f"O{m:05d}-{len(rows)}", t, 10.0 + 5 * (m % 3)))
            t += rng.exponential(1 / lam)
    tx = pd.DataFrame(rows, columns=[C.MEMBER_ID, C.ORDER_ID, "t", C.AMOUNT])
    tx[C.TS] = pd.Timestamp("2023-01-01", tz="UTC") + pd.to_timedelta(tx["t"], unit="D")
    tx[C.ITEM_ID], tx[C.QUANTITY] = "I1", 1.0
    return tx.drop(columns="t"), pd.DataFrame({"rate": rates})


def test_baselines_rank_members_sensibly_on_poisson_buyers() -> None:
    tx, _ = _poisson_history(600)
    cutoff = date(2023, 9, 1)
    before = tx[tx[C.TS] < pd.Timestamp(cutoff, tz="UTC")]
    g = before.groupby(C.MEMBER_ID)
    members = g.size().index
    last = g[C.TS].max()
    recency = (pd.Timestamp(cutoff, tz="UTC") - last).dt.total_seconds() / 86400
    days = before.assign(day=before[C.TS].dt.floor("D")).groupby(C.MEMBER_ID)["day"].agg(["min", "max", "nunique"])
    gap = ((days["max"] - days["min"]).dt.days / (days["nunique"] - 1)).where(days["nunique"] > 1)
    frame = pd.DataFrame({
        C.MEMBER_ID: members, C.EVENT_TIMESTAMP: pd.Timestamp(cutoff, tz="UTC"),
        F.RECENCY_DAYS: recency.to_numpy(), F.ORDERS_TOTAL: g.size().to_numpy(),
        F.TENURE_DAYS: 240, F.GAP_MEAN_DAYS: gap.to_numpy(), F.GAP_STD_DAYS: np.nan,
        F.AVG_ORDER_VALUE: g[C.AMOUNT].mean().to_numpy(), F.spend(90): g[C.AMOUNT].sum().to_numpy() / 8,
    })
    after = tx[(tx[C.TS] >= pd.Timestamp(cutoff, tz="UTC"))
               & (tx[C.TS] < pd.Timestamp(cutoff, tz="UTC") + pd.Timedelta(days=90))]
    bought = frame[C.MEMBER_ID].isin(after[C.MEMBER_ID]).to_numpy()
    from training.metrics import roc_auc

    churn = churn_baselines(frame, tx, horizon_days=90)
    assert roc_auc(~bought, churn["bg_nbd"]) > 0.7
    assert roc_auc(~bought, churn["rfm_rule"]) > 0.65
    forecasts = next_purchase_baselines(frame, tx, interval=0.8, max_days=120)
    assert set(forecasts) == {"mean_gap", "bg_nbd"}
    for f in forecasts.values():
        assert (f[NP.P_7D] <= f[NP.P_30D] + 1e-12).all()
        assert roc_auc(bought, f[NP.P_30D]) > 0.6
    value = value_baselines(frame, tx, horizon_days=90, windows_days=(90,))
    assert (value["bg_nbd"] >= 0).all() and (value["last_period"] >= 0).all()
    bg, history = bg_nbd_at(tx, cutoff, frame[C.MEMBER_ID])
    assert history.bought.all() and bg.params_.converged


def test_bg_nbd_at_refuses_too_little_history() -> None:
    tx, _ = _poisson_history(5)
    with pytest.raises(ValueError, match="bought before the cutoff"):
        bg_nbd_at(tx, date(2023, 1, 2), ["M00000"])

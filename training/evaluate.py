"""Evaluation of the three member models and their baselines on one backtest cutoff.

Every model is reported beside its baselines on the same rows (DESIGN.md, evaluation protocol):

| model | baselines |
|---|---|
| churn | ``rfm_rule`` (recency and frequency quintiles, nothing fitted), ``bg_nbd`` (1 - P(a purchase in H)) |
| next purchase | ``mean_gap`` (the member's own mean gap and its spread), ``bg_nbd`` (P(a purchase within t)) |
| value | ``last_period`` (spend in the previous window of the same length), ``bg_nbd`` (expected purchases x
  average order value) |

BG/NBD is refitted at the backtest cutoff on purchases before it (:func:`bg_nbd_at`), so it is an honest
baseline: nothing after the cutoff is read. Metric functions are plain functions of arrays.

Example::

    from training.evaluate import churn_metrics, churn_baselines
    churn_metrics(frame["churn"], model.predict_proba(frame))       # {'auc': ..., 'log_loss': ..., ...}
    scores = churn_baselines(frame, transactions, cutoff, horizon_days=90)
    {k: churn_metrics(frame["churn"], s) for k, s in scores.items()}
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import ndtr

from features.contract import C, F
from training.baselines import BgNbd, mean_gap_days_to_next, rfm_churn_score
from training.labels import L, split_calibration_holdout
from training.metrics import brier, concordance_index, lift_by_decile, log_loss, roc_auc
from training.next_purchase import NP

log = logging.getLogger(__name__)

MODEL = "model"
"""Key of the model's metrics in a backtest report; baselines follow under their own names."""
MAX_CONCORDANCE_ROWS = 200_000
"""Harrell's C is a Python loop: larger frames are evaluated on a fixed, evenly spaced sample."""
_P_EPS = 1e-6


# --- metrics -----------------------------------------------------------------------------------------------


def churn_metrics(y_true: Any, p: Any) -> dict[str, float]:
    """AUC, log loss, Brier score, the lift of the top decile and the mean predicted vs observed rate."""
    y = np.asarray(y_true, dtype=float)
    s = np.clip(np.asarray(p, dtype=float), _P_EPS, 1 - _P_EPS)
    lift = lift_by_decile(y, s)
    return {"auc": roc_auc(y, s), "log_loss": log_loss(y, s), "brier": brier(y, s),
            "lift_decile1": float(lift.loc[lift["decile"] == 1, "lift"].iloc[0]),
            "mean_predicted": float(s.mean()), "observed_rate": float(y.mean()), "rows": float(len(y))}


def _sample_positions(n: int, cap: int) -> np.ndarray:
    return np.arange(n) if n <= cap else np.linspace(0, n - 1, cap).round().astype(np.int64)


def next_purchase_metrics(duration: Any, event: Any, pred: pd.DataFrame) -> dict[str, float]:
    """Metrics of a next-purchase forecast (columns of :class:`training.next_purchase.NP`) against
    right-censored outcomes (``duration`` days from the cutoff, ``event`` true when observed).

    - ``c_index``: Harrell's C of the expected days (NaN, beyond the horizon, ranks last);
    - ``coverage``: share of rows whose outcome is known relative to their interval that fall inside it
      (an event inside ``[lower, upper]``; a censored row counts only when its follow-up already passed
      ``upper``, as a miss, or when ``upper`` is open and follow-up passed ``lower``, as a hit);
    - ``auc_30d`` / ``brier_30d`` (and 7d): P(purchase within 30 days) against the outcome, on rows
      followed up at least that long;
    - ``mae_days``: absolute error of the expected days on observed purchases within the horizon.
    """
    d = np.asarray(duration, dtype=float)
    e = np.asarray(event).astype(bool)
    if len(d) != len(pred) or len(e) != len(d):
        raise ValueError(f"duration ({len(d)}), event ({len(e)}) and predictions ({len(pred)}) differ in length")
    expected = pred[NP.EXPECTED_DAYS].to_numpy(dtype=float)
    lo = pred[NP.LOWER_DAYS].to_numpy(dtype=float)
    hi = pred[NP.UPPER_DAYS].to_numpy(dtype=float)
    hi_open = np.where(np.isnan(hi), np.inf, hi)
    out: dict[str, float] = {"rows": float(len(d)), "event_rate": float(e.mean())}
    ranked = np.where(np.isnan(expected), np.nanmax(np.append(expected, d)) * 2 + 1, expected)
    pos = _sample_positions(len(d), MAX_CONCORDANCE_ROWS)
    try:
        out["c_index"] = concordance_index(d[pos], ranked[pos], e[pos])
    except ValueError:
        out["c_index"] = float("nan")
    inside = e & (d >= lo) & (d <= hi_open)
    known = e | (d > hi_open) | (np.isinf(hi_open) & (d >= lo))
    hit = inside | (~e & np.isinf(hi_open) & (d >= lo))
    out["coverage"] = float(hit[known].mean()) if known.any() else float("nan")
    out["coverage_rows"] = float(known.sum())
    for days, col in ((7, NP.P_7D), (30, NP.P_30D)):
        followed = e | (d >= days)
        y = (e & (d < days))[followed].astype(float)
        p = pred[col].to_numpy(dtype=float)[followed]
        if followed.sum() and 0 < y.mean() < 1:
            out[f"auc_{days}d"] = roc_auc(y, p)
            out[f"brier_{days}d"] = brier(y, p)
        out[f"rate_{days}d"] = float(y.mean()) if len(y) else float("nan")
        out[f"mean_p_{days}d"] = float(np.mean(p)) if len(p) else float("nan")
    ok = e & ~np.isnan(expected)
    out["mae_days"] = float(np.abs(expected[ok] - d[ok]).mean()) if ok.any() else float("nan")
    return out


def value_metrics(y_true: Any, pred: Any) -> dict[str, float]:
    """RMSE, MAE, Spearman correlation, normalised Gini (ranking of spend) and predicted / actual total."""
    y = np.asarray(y_true, dtype=float)
    p = np.asarray(pred, dtype=float)
    if y.shape != p.shape:
        raise ValueError(f"y_true and pred differ in shape: {y.shape} vs {p.shape}")
    if np.isnan(y).any() or np.isnan(p).any():
        raise ValueError("value_metrics: NaN in the labels or the predictions")
    total = y.sum()
    return {"rmse": float(np.sqrt(np.mean((y - p) ** 2))), "mae": float(np.mean(np.abs(y - p))),
            "spearman": float(pd.Series(y).corr(pd.Series(p), method="spearman")),
            "gini": _normalised_gini(y, p), "total_ratio": float(p.sum() / total) if total else float("nan"),
            "rows": float(len(y))}


def _normalised_gini(y: np.ndarray, p: np.ndarray) -> float:
    """Gini of the spend captured when ranking by ``p``, over the Gini of the perfect ranking."""
    def gini(score: np.ndarray) -> float:
        order = np.lexsort((np.arange(len(y)), -score))
        captured = np.cumsum(y[order]) / y.sum()
        return float(captured.mean() - (np.arange(1, len(y) + 1) / len(y)).mean())

    if y.sum() <= 0:
        return float("nan")
    return gini(p) / gini(y)


# --- BG/NBD at a cutoff -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CutoffHistory:
    """Per-member purchase history before a cutoff in days (BTYD summaries), aligned to a frame's rows."""

    frequency: np.ndarray  # repeat purchase days; 0 for a member without purchases
    recency: np.ndarray  # first to last purchase day
    T: np.ndarray  # first purchase day to the cutoff (tenure for a member without purchases)
    bought: np.ndarray  # at least one purchase before the cutoff


def bg_nbd_at(transactions: pd.DataFrame, cutoff: date, member_ids: Any,
              tenure_days: Any | None = None) -> tuple[BgNbd, CutoffHistory]:
    """BG/NBD fitted on purchase days before ``cutoff`` (days as the time unit), and the summaries of
    ``member_ids`` (members without a purchase get x = 0, t_x = 0, T = their tenure, or 0)."""
    summary = split_calibration_holdout(transactions, cutoff, cutoff)
    # T counts to the last calibration day; the cutoff is the midnight after it
    summary[L.T_CAL] = summary[L.T_CAL] + 1.0
    if len(summary) < 10:
        raise ValueError(f"BG/NBD at {cutoff}: only {len(summary)} member(s) bought before the cutoff")
    model = BgNbd(penalizer=1e-6).fit(summary[L.FREQUENCY_CAL], summary[L.RECENCY_CAL], summary[L.T_CAL])
    ids = pd.Index(pd.Series(member_ids).astype(str))
    aligned = summary.reindex(ids)
    bought = aligned[L.FREQUENCY_CAL].notna().to_numpy()
    tenure = (np.zeros(len(ids)) if tenure_days is None
              else np.nan_to_num(np.asarray(tenure_days, dtype=float), nan=0.0).clip(min=0))
    history = CutoffHistory(
        frequency=aligned[L.FREQUENCY_CAL].fillna(0).to_numpy(dtype=float),
        recency=aligned[L.RECENCY_CAL].fillna(0).to_numpy(dtype=float),
        T=np.where(bought, aligned[L.T_CAL].to_numpy(dtype=float), tenure),
        bought=bought)
    p = model.params_
    log.info("BG/NBD at %s: r %.3f alpha %.2f a %.3f b %.3f on %d members", cutoff, p.r, p.alpha, p.a, p.b,
             len(summary))
    return model, history


def _cutoff_date(frame: pd.DataFrame) -> date:
    stamps = frame[C.EVENT_TIMESTAMP].drop_duplicates()
    if len(stamps) != 1:
        raise ValueError(f"a backtest frame holds one cutoff; this one holds {len(stamps)}")
    return pd.Timestamp(stamps.iloc[0]).tz_convert("UTC").date()


# --- baselines ---------------------------------------------------------------------------------------------


def churn_baselines(frame: pd.DataFrame, transactions: pd.DataFrame, horizon_days: int,
                    bins: int = 5) -> dict[str, np.ndarray]:
    """Churn scores of the RFM rule and of BG/NBD for every row of a one-cutoff backtest frame."""
    cutoff = _cutoff_date(frame)
    rule = rfm_churn_score(frame[F.RECENCY_DAYS].to_numpy(dtype=float),
                           frame[F.ORDERS_TOTAL].to_numpy(dtype=float), bins)
    bg, h = bg_nbd_at(transactions, cutoff, frame[C.MEMBER_ID], frame.get(F.TENURE_DAYS))
    p_buy = bg.p_purchase_within(float(horizon_days), h.frequency, h.recency, h.T)
    return {"rfm_rule": rule, "bg_nbd": 1.0 - p_buy}


def _quantile_days(cdf: np.ndarray, grid: np.ndarray, q: float) -> np.ndarray:
    """First grid day where each row's non-decreasing CDF reaches ``q`` (linear inside a step); NaN when
    it never does."""
    reached = cdf >= q
    idx = reached.argmax(axis=1)
    found = reached.any(axis=1)
    prev_day = np.where(idx > 0, grid[np.maximum(idx - 1, 0)], 0.0)
    prev_cdf = np.where(idx > 0, cdf[np.arange(len(cdf)), np.maximum(idx - 1, 0)], 0.0)
    cur_cdf = cdf[np.arange(len(cdf)), idx]
    frac = np.where(cur_cdf > prev_cdf, (q - prev_cdf) / np.maximum(cur_cdf - prev_cdf, 1e-12), 1.0)
    day = prev_day + np.clip(frac, 0, 1) * (grid[idx] - prev_day)
    return np.where(found, day, np.nan)


def _forecast_frame(index: pd.Index, cdf: np.ndarray, grid: np.ndarray, interval: float) -> pd.DataFrame:
    tail = (1.0 - interval) / 2
    col = {int(g): j for j, g in enumerate(grid)}
    out = pd.DataFrame({
        NP.EXPECTED_DAYS: _quantile_days(cdf, grid, 0.5),
        NP.LOWER_DAYS: _quantile_days(cdf, grid, tail),
        NP.UPPER_DAYS: _quantile_days(cdf, grid, 1.0 - tail),
        NP.P_7D: cdf[:, col[7]], NP.P_30D: cdf[:, col[30]],
    }, index=index)
    out[NP.LOWER_DAYS] = out[NP.LOWER_DAYS].fillna(float(grid[-1]))
    out[NP.BEYOND_HORIZON] = out[NP.EXPECTED_DAYS].isna()
    return out


def _day_grid(max_days: int) -> np.ndarray:
    return np.unique(np.concatenate([np.arange(1, 61), np.arange(60, max_days + 1, 5), [7, 30, max_days]]))


def next_purchase_baselines(frame: pd.DataFrame, transactions: pd.DataFrame, interval: float,
                            max_days: int = 365) -> dict[str, pd.DataFrame]:
    """Next-purchase forecasts (NP columns) of the member's own mean gap and of BG/NBD.

    ``mean_gap``: the time since the last purchase to the next is normal with the member's own gap mean
    and spread (population medians when the member has fewer than two or three orders), conditioned on
    not having bought since the last purchase. ``bg_nbd``: P(a purchase within t) of the BG/NBD refitted
    at the cutoff.
    """
    cutoff = _cutoff_date(frame)
    grid = _day_grid(max_days).astype(float)
    rec = frame[F.RECENCY_DAYS].to_numpy(dtype=float)
    gap = frame[F.GAP_MEAN_DAYS].to_numpy(dtype=float)
    sd = frame[F.GAP_STD_DAYS].to_numpy(dtype=float)
    median_gap = float(np.nanmedian(gap)) if np.isfinite(gap).any() else 30.0
    mu = np.where(np.isnan(gap), median_gap, gap)
    median_sd = float(np.nanmedian(sd[sd > 0])) if (sd > 0).any() else median_gap / 2
    sigma = np.where(np.isnan(sd) | (sd <= 0), np.maximum(median_sd, 0.5 * mu), sd).clip(min=1.0)
    r = np.nan_to_num(rec, nan=0.0)
    # P(T <= r + t | T > r) with T ~ N(mu, sigma)
    s_r = 1.0 - ndtr((r - mu) / sigma)
    cdf_gap = (ndtr((r[:, None] + grid[None, :] - mu[:, None]) / sigma[:, None]) - (1.0 - s_r)[:, None])
    cdf_gap = np.clip(cdf_gap / np.maximum(s_r, 1e-9)[:, None], 0.0, 1.0)
    cdf_gap = np.where(np.isnan(rec)[:, None], 0.0, cdf_gap)  # never bought: no cycle to speak of
    mean_gap = _forecast_frame(frame.index, np.maximum.accumulate(cdf_gap, axis=1), grid, interval)
    mean_gap[NP.EXPECTED_DAYS] = np.where(np.isnan(rec), np.nan,
                                          mean_gap_days_to_next(mu, r))  # the baseline's own point forecast
    mean_gap[NP.BEYOND_HORIZON] = mean_gap[NP.EXPECTED_DAYS].isna()

    bg, h = bg_nbd_at(transactions, cutoff, frame[C.MEMBER_ID], frame.get(F.TENURE_DAYS))
    cdf_bg = np.column_stack([bg.p_purchase_within(float(t), h.frequency, h.recency, h.T) for t in grid])
    return {"mean_gap": mean_gap, "bg_nbd": _forecast_frame(frame.index, cdf_bg, grid, interval)}


def value_baselines(frame: pd.DataFrame, transactions: pd.DataFrame, horizon_days: int,
                    windows_days: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Expected spend in the next ``horizon_days``: the previous window's spend (the window in
    ``windows_days`` closest to the horizon, scaled to it) and BG/NBD expected purchases x average order
    value (the population's average for a member without a purchase)."""
    cutoff = _cutoff_date(frame)
    window = min(windows_days, key=lambda w: abs(w - horizon_days))
    last = frame[F.spend(window)].to_numpy(dtype=float) * horizon_days / window
    bg, h = bg_nbd_at(transactions, cutoff, frame[C.MEMBER_ID], frame.get(F.TENURE_DAYS))
    aov = frame[F.AVG_ORDER_VALUE].to_numpy(dtype=float)
    aov = np.where(np.isnan(aov), np.nanmean(aov) if np.isfinite(aov).any() else 0.0, aov)
    purchases = np.where(h.bought, bg.expected_purchases(float(horizon_days), h.frequency, h.recency, h.T),
                         0.0)
    return {"last_period": np.nan_to_num(last, nan=0.0), "bg_nbd": purchases * aov}


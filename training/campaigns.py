"""Campaign effect: the treatment arm against its random holdout, from a campaign log and later purchases.

For each campaign and window W (7, 14 and 30 days by default) a member *repurchased* when they have a
purchase line with ``sent_at < ts <= sent_at + W days`` (the demo truth's definition). Per campaign:

- ``rate_treatment``, ``rate_holdout``: the share of each arm that repurchased;
- ``lift``: ``rate_treatment - rate_holdout`` with a 95% Wald interval
  (``z * sqrt(p_t (1 - p_t) / n_t + p_h (1 - p_h) / n_h)``), and ``lift_rel`` = lift / rate_holdout;
- ``incremental_revenue``: (mean spend per treated member - mean spend per holdout member) x treated
  members, spend being the net amount of the window's lines, with a 95% interval from the two arms'
  sample variances (Welch's standard error);
- ``redemption_rate``: the share of treated members with an order in the window whose discount matches
  the coupon's face value (the contract's transactions carry no coupon code, so a coupon order is
  recognised by its discount: within ``tolerance`` of ``coupon_value``, or the whole order when it cost
  less than the coupon). Null without a coupon value.

Example::

    report = campaign_effects(log, transactions, windows=(7, 14, 30))
    report.loc[report.window_days == 30, ["campaign_id", "lift", "lift_low", "lift_high"]]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from features.contract import C

TREATMENT, HOLDOUT = "treatment", "holdout"
POOLED = "ALL"
Z95 = 1.959963984540054


class CE:
    """Columns of :func:`campaign_effects`."""

    CAMPAIGN_ID = C.CAMPAIGN_ID
    WINDOW = "window_days"
    N_TREATMENT = "n_treatment"
    N_HOLDOUT = "n_holdout"
    RATE_TREATMENT = "rate_treatment"
    RATE_HOLDOUT = "rate_holdout"
    LIFT = "lift"
    LIFT_LOW = "lift_low"
    LIFT_HIGH = "lift_high"
    LIFT_REL = "lift_rel"
    REVENUE_TREATMENT = "revenue_per_treated"
    REVENUE_HOLDOUT = "revenue_per_holdout"
    INCREMENTAL = "incremental_revenue"
    INCREMENTAL_LOW = "incremental_revenue_low"
    INCREMENTAL_HIGH = "incremental_revenue_high"
    REDEMPTION = "redemption_rate"
    COLUMNS = (CAMPAIGN_ID, WINDOW, N_TREATMENT, N_HOLDOUT, RATE_TREATMENT, RATE_HOLDOUT, LIFT, LIFT_LOW,
               LIFT_HIGH, LIFT_REL, REVENUE_TREATMENT, REVENUE_HOLDOUT, INCREMENTAL, INCREMENTAL_LOW,
               INCREMENTAL_HIGH, REDEMPTION)


LINE_COLUMNS = (C.MEMBER_ID, C.ORDER_ID, C.TS, C.AMOUNT, C.DISCOUNT, C.IS_RETURN)
"""The transaction columns the analysis reads."""


def read_log(settings: Any, path: Path | None = None) -> pd.DataFrame:
    """A campaign log: ``path`` (.csv, else parquet) or, without one, the lake's ``campaigns`` table
    (FileNotFoundError saying to ingest when the lake has none)."""
    from training.dataset import read_lake_table

    if path is None:
        return read_lake_table(settings, "campaigns")
    return pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)


def read_lines(settings: Any) -> pd.DataFrame:
    """The lake's transaction lines, :data:`LINE_COLUMNS` only."""
    from training.dataset import read_lake_table

    return read_lake_table(settings, "transactions", columns=list(LINE_COLUMNS))


class CampaignLogError(ValueError):
    """The campaign log cannot be analysed as given (what is wrong and where is in the message)."""


def check_log(log: pd.DataFrame) -> pd.DataFrame:
    """The log with its columns checked: every contract column present, arms ``treatment``/``holdout``,
    one row per (campaign, member), ``sent_at`` a time. Raises :class:`CampaignLogError` naming the rows."""
    need = [C.CAMPAIGN_ID, C.MEMBER_ID, C.ARM, C.SENT_AT]
    missing = [c for c in need if c not in log.columns]
    if missing:
        raise CampaignLogError(f"campaign log lacks column(s) {', '.join(missing)}")
    out = log.copy()
    out[C.CAMPAIGN_ID] = out[C.CAMPAIGN_ID].astype(str)
    out[C.MEMBER_ID] = out[C.MEMBER_ID].astype(str)
    bad_arm = ~out[C.ARM].isin([TREATMENT, HOLDOUT])
    if bad_arm.any():
        rows = np.flatnonzero(bad_arm.to_numpy())[:5].tolist()
        raise CampaignLogError(f"campaign log rows {rows}: arm must be 'treatment' or 'holdout', got "
                               f"{sorted(out.loc[bad_arm, C.ARM].astype(str).unique())[:5]}")
    dup = out.duplicated([C.CAMPAIGN_ID, C.MEMBER_ID], keep=False)
    if dup.any():
        first = out.loc[dup].iloc[0]
        raise CampaignLogError(f"campaign log has member {first[C.MEMBER_ID]!r} more than once in campaign "
                               f"{first[C.CAMPAIGN_ID]!r} (rows {np.flatnonzero(dup.to_numpy())[:5].tolist()})")
    sent = pd.to_datetime(out[C.SENT_AT], utc=True, errors="coerce")
    if sent.isna().any():
        rows = np.flatnonzero(sent.isna().to_numpy())[:5].tolist()
        raise CampaignLogError(f"campaign log rows {rows}: sent_at is missing or not a time")
    out[C.SENT_AT] = sent
    for c in (C.COUPON, C.COUPON_VALUE):
        if c not in out.columns:
            out[c] = None if c == C.COUPON else np.nan
    return out


def window_outcomes(log: pd.DataFrame, lines: pd.DataFrame, window_days: int,
                     tolerance: float) -> pd.DataFrame:
    """Per row of a checked ``log`` (:func:`check_log`), in order: ``repurchased`` (bool), ``spend`` (net
    amount of the window's lines) and ``redeemed`` (1.0/0.0, NaN without a coupon value). ``lines``: the
    transactions with ``ts`` as UTC times."""
    lines = lines[[C.MEMBER_ID, C.ORDER_ID, C.TS, C.AMOUNT, C.DISCOUNT, C.IS_RETURN]]
    row = log[[C.MEMBER_ID, C.SENT_AT, C.COUPON_VALUE]].reset_index(drop=True)
    row["_row"] = np.arange(len(row))
    j = row.merge(lines, on=C.MEMBER_ID, how="inner")
    end = j[C.SENT_AT] + pd.Timedelta(days=window_days)
    j = j[(j[C.TS] > j[C.SENT_AT]) & (j[C.TS] <= end)]
    purchase = j[~j[C.IS_RETURN].astype(bool)]
    out = pd.DataFrame({"_row": row["_row"]})
    out["repurchased"] = out["_row"].isin(purchase["_row"])
    spend = j.groupby("_row")[C.AMOUNT].sum()
    out["spend"] = out["_row"].map(spend).fillna(0.0).astype(float)
    orders = purchase.groupby(["_row", C.ORDER_ID]).agg(discount=(C.DISCOUNT, "sum"), amount=(C.AMOUNT, "sum"),
                                                        value=(C.COUPON_VALUE, "first")).reset_index()
    gross = orders["discount"] + orders["amount"]
    hit = ((orders["discount"] - orders["value"]).abs() <= tolerance) | (
        (gross < orders["value"] + tolerance) & (orders["amount"].abs() <= tolerance))
    redeemed = orders.loc[hit & orders["value"].notna(), "_row"].unique()
    out["redeemed"] = out["_row"].isin(redeemed).astype(float)
    out.loc[row[C.COUPON_VALUE].isna().to_numpy(), "redeemed"] = np.nan
    return out


def lift_interval(k_t: int, n_t: int, k_h: int, n_h: int, z: float = Z95) -> tuple[float, float, float]:
    """(lift, low, high): difference of two proportions with the Wald interval (NaN for an empty arm)."""
    if n_t == 0 or n_h == 0:
        return math.nan, math.nan, math.nan
    p_t, p_h = k_t / n_t, k_h / n_h
    se = math.sqrt(p_t * (1 - p_t) / n_t + p_h * (1 - p_h) / n_h)
    d = p_t - p_h
    return d, d - z * se, d + z * se


def campaign_effects(log: pd.DataFrame, transactions: pd.DataFrame, windows: Sequence[int] = (7, 14, 30),
                     tolerance: float = 0.05, pooled: bool = True) -> pd.DataFrame:
    """The effect of every campaign of ``log`` (and, with ``pooled``, of all together as ``ALL``) per window,
    :class:`CE` columns, campaigns in id order then windows ascending."""
    log = check_log(log)
    lines = transactions.copy()
    lines[C.TS] = pd.to_datetime(lines[C.TS], utc=True)
    lines[C.MEMBER_ID] = lines[C.MEMBER_ID].astype(str)
    if C.DISCOUNT not in lines.columns:
        lines[C.DISCOUNT] = 0.0
    lines[C.DISCOUNT] = lines[C.DISCOUNT].fillna(0.0)
    if C.IS_RETURN not in lines.columns:
        lines[C.IS_RETURN] = False
    lines[C.IS_RETURN] = lines[C.IS_RETURN].fillna(False)
    lines = lines[lines[C.MEMBER_ID].isin(set(log[C.MEMBER_ID]))]
    rows: list[dict[str, object]] = []
    treated = (log[C.ARM] == TREATMENT).to_numpy()
    groups = [(str(c), np.flatnonzero((log[C.CAMPAIGN_ID] == c).to_numpy()))
              for c in sorted(log[C.CAMPAIGN_ID].unique())]
    if pooled and len(groups) > 1:
        groups.append((POOLED, np.arange(len(log))))
    for w in sorted({int(w) for w in windows}):
        if w <= 0:
            raise ValueError(f"windows must be positive days, got {w}")
        o = window_outcomes(log, lines, w, tolerance)
        rep, spend, red = o["repurchased"].to_numpy(), o["spend"].to_numpy(), o["redeemed"].to_numpy()
        for cid, at in groups:
            t, h = at[treated[at]], at[~treated[at]]
            lift, lo, hi = lift_interval(int(rep[t].sum()), len(t), int(rep[h].sum()), len(h))
            rate_h = rep[h].mean() if len(h) else math.nan
            m_t = spend[t].mean() if len(t) else math.nan
            m_h = spend[h].mean() if len(h) else math.nan
            var = (spend[t].var(ddof=1) / len(t) if len(t) > 1 else math.nan) + \
                  (spend[h].var(ddof=1) / len(h) if len(h) > 1 else math.nan)
            inc = (m_t - m_h) * len(t)
            half = Z95 * math.sqrt(var) * len(t) if var == var else math.nan
            coupon = red[t][~np.isnan(red[t])]
            rows.append({CE.CAMPAIGN_ID: cid, CE.WINDOW: w, CE.N_TREATMENT: len(t), CE.N_HOLDOUT: len(h),
                         CE.RATE_TREATMENT: rep[t].mean() if len(t) else math.nan, CE.RATE_HOLDOUT: rate_h,
                         CE.LIFT: lift, CE.LIFT_LOW: lo, CE.LIFT_HIGH: hi,
                         CE.LIFT_REL: lift / rate_h if rate_h else math.nan,
                         CE.REVENUE_TREATMENT: m_t, CE.REVENUE_HOLDOUT: m_h, CE.INCREMENTAL: inc,
                         CE.INCREMENTAL_LOW: inc - half, CE.INCREMENTAL_HIGH: inc + half,
                         CE.REDEMPTION: coupon.mean() if len(coupon) else math.nan})
    out = pd.DataFrame(rows, columns=list(CE.COLUMNS))
    key = out[CE.CAMPAIGN_ID].where(out[CE.CAMPAIGN_ID] != POOLED, "\uffff")
    return out.assign(_k=key).sort_values(["_k", CE.WINDOW], kind="mergesort").drop(columns="_k") \
        .reset_index(drop=True)

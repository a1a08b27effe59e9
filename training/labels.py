"""Labels at cutoff dates: churn, days to next purchase, 12-month spend, per-category next purchase.

The point-in-time rule, shared with feature computation: a cutoff date ``D`` stands for the UTC midnight
that starts ``D``. Features describe ``ts < D`` (they are fetched from Feast with ``D`` as the entity
timestamp); labels describe ``ts >= D``. Nothing here reads a transaction before the cutoff except to
decide which (member, category) pairs exist, so labels cannot leak into features and vice versa.

``end`` is the last day covered by the data (inclusive): follow-up of every label stops at the midnight
after it. A label whose window reaches past that midnight is not observable:

- churn (``L.CHURN``: 1 = no purchase in ``[D, D + H)``, H = ``settings.lifecycle.horizon_days``) and the
  number of orders in the window are ``<NA>`` and ``L.LABEL_OBSERVABLE`` is false. Train churn only on
  ``df[df[L.LABEL_OBSERVABLE]]``. Do not keep the rows of such a cutoff whose member happened to buy before
  the end (their label would be a known 0): keeping them and dropping the rest selects on the outcome and
  biases the rate of churn downwards. ``<NA>`` in a label column makes LightGBM fail loudly if it slips
  through.
- spend in the next ``spend_days`` days (``L.SPEND_NEXT``; default ``settings.training.value_horizon_days``,
  365) is NaN when ``L.SPEND_OBSERVABLE`` is false, with the
  same rule.
- days to next purchase are never missing: they are right-censored at the end of the data
  (``L.NEXT_EVENT`` false, duration = days from the cutoff to the end).

One order is one purchase event (its earliest line's ``ts``); purchases are the lines that are not returns.
Spend is the amount of purchase lines (returns are not netted out).

The calibration/holdout split of the BTYD literature is :func:`split_calibration_holdout`, the one place
that turns a transaction log into (frequency, recency, T) summaries, so that calibration data cannot see
holdout data.

Example::

    from datetime import date
    from training.labels import L, build_labels
    labels = build_labels(transactions, members, [date(2024, 1, 1), date(2024, 4, 1)], settings)
    train = labels[labels[L.LABEL_OBSERVABLE]]
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import date, datetime

import numpy as np
import pandas as pd

from features.contract import MEMBERS, TRANSACTIONS, C
from features.lake import connect_duckdb
from features.settings import Settings

log = logging.getLogger(__name__)

_US_PER_DAY = 86_400_000_000
_S_PER_DAY = 86_400


class L:
    """Label column names (one row per member and cutoff unless said otherwise)."""

    CUTOFF = "cutoff"  # UTC midnight starting the cutoff date; the entity timestamp of the feature join
    CHURN = "churn"  # 1: no purchase in [cutoff, cutoff + H); <NA> when not observable
    LABEL_OBSERVABLE = "label_observable"  # cutoff + H is within the data
    ORDERS_NEXT_H = "orders_next_h"  # orders in [cutoff, cutoff + H); <NA> when not observable
    DAYS_TO_NEXT = "days_to_next_purchase"  # days from the cutoff to the next order, or to the end
    NEXT_EVENT = "next_purchase_observed"  # true: DAYS_TO_NEXT is an observed purchase; false: censored
    SPEND_NEXT = "spend_next"  # purchase amount in [cutoff, cutoff + spend_days); NaN if unobservable
    SPEND_OBSERVABLE = "spend_observable"

    # long frame of per-category next purchase (member, category, cutoff)
    CAT_DAYS_TO_NEXT = "cat_days_to_next_purchase"
    CAT_NEXT_EVENT = "cat_next_purchase_observed"

    # calibration / holdout summaries (split_calibration_holdout), times in `unit_days`
    FREQUENCY_CAL = "frequency_cal"  # repeat purchase periods in the calibration period
    RECENCY_CAL = "recency_cal"  # from the first to the last purchase period
    T_CAL = "T_cal"  # from the first purchase period to the end of calibration
    MONETARY_CAL = "monetary_value_cal"  # mean amount of the repeat purchase periods (0 when none)
    FREQUENCY_HOLDOUT = "frequency_holdout"  # purchase periods in the holdout
    MONETARY_HOLDOUT = "monetary_value_holdout"  # mean amount of the holdout purchase periods (0 when none)
    DURATION_HOLDOUT = "duration_holdout"


# --- input checks -----------------------------------------------------------------------------------------


def _check_columns(df: pd.DataFrame, needed: Sequence[str], what: str) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing required column(s) {missing}; it has {list(df.columns)}")


def _utc_us(s: pd.Series, what: str, column: str) -> np.ndarray:
    """Timestamps as int64 microseconds since the epoch; naive or null values are an error."""
    if not isinstance(s.dtype, pd.DatetimeTZDtype):
        raise ValueError(f"{what}: column {column!r} must be a timezone-aware UTC timestamp (the lake's "
                         f"type), got dtype {s.dtype}")
    if s.isna().any():
        row = int(np.flatnonzero(s.isna().to_numpy())[0])
        raise ValueError(f"{what}: row {row}, column {column!r} is null")
    naive = s.dt.tz_convert("UTC").dt.tz_localize(None)
    return naive.to_numpy(dtype="datetime64[us]").view(np.int64)


def _midnight_us(d: date | datetime | pd.Timestamp | str, what: str) -> int:
    """The UTC midnight starting day ``d``, in microseconds since the epoch."""
    ts = pd.Timestamp(d)
    if ts.tzinfo is not None:
        ts = ts.tz_convert("UTC").tz_localize(None)
    if ts != ts.normalize():
        raise ValueError(f"{what} {d!r} is not a date (it has a time of day); pass a date")
    return int(ts.normalize().value // 1_000)  # Timestamp.value is in nanoseconds whatever the unit


def _as_utc(us: np.ndarray | int) -> pd.DatetimeIndex | pd.Timestamp:
    if np.ndim(us) == 0:
        return pd.Timestamp(int(us), unit="us", tz="UTC")
    return pd.DatetimeIndex(pd.to_datetime(np.asarray(us, dtype=np.int64), unit="us", utc=True))


@dataclass(frozen=True)
class _Orders:
    """Purchase events: one row per (member, order) or (member, category, order)."""

    member_id: np.ndarray  # object: member ids
    category: np.ndarray | None
    ts_us: np.ndarray  # int64: the order's earliest line
    amount: np.ndarray  # float64: amount of its purchase lines


def _purchase_orders(transactions: pd.DataFrame, by_category: bool) -> _Orders:
    """Collapse non-return lines to orders (DuckDB: multi-threaded, fine at tens of millions of lines)."""
    what = "transactions"
    needed = [C.MEMBER_ID, C.ORDER_ID, C.TS, C.AMOUNT] + ([C.CATEGORY] if by_category else [])
    _check_columns(transactions, needed, what)
    ts_us = _utc_us(transactions[C.TS], what, C.TS)
    for col in (C.MEMBER_ID, C.ORDER_ID):
        if transactions[col].isna().any():
            row = int(np.flatnonzero(transactions[col].isna().to_numpy())[0])
            raise ValueError(f"{what}: row {row}, column {col!r} is null")
    if C.IS_RETURN in transactions.columns:
        is_return = transactions[C.IS_RETURN].fillna(False).astype(bool).to_numpy()
    else:
        is_return = np.zeros(len(transactions), dtype=bool)
    frame = pd.DataFrame({
        "m": transactions[C.MEMBER_ID].astype(str).to_numpy(),
        "o": transactions[C.ORDER_ID].astype(str).to_numpy(),
        "t": ts_us,
        "a": pd.to_numeric(transactions[C.AMOUNT], errors="raise").astype(float).fillna(0.0).to_numpy(),
        "r": is_return,
    })
    if by_category:
        cat = transactions[C.CATEGORY]
        if cat.isna().any():
            row = int(np.flatnonzero(cat.isna().to_numpy())[0])
            raise ValueError(f"{what}: row {row}, column {C.CATEGORY!r} is null (ingest fills it from items)")
        frame["c"] = cat.astype(str).to_numpy()
    keys = "m, c, o" if by_category else "m, o"
    con = connect_duckdb()
    try:
        con.register("lines", frame)
        out = con.execute(
            f"SELECT {keys}, min(t) AS t, sum(a) AS a FROM lines WHERE NOT r GROUP BY {keys} ORDER BY {keys}"
        ).fetchdf()
    finally:
        con.close()
    return _Orders(
        member_id=out["m"].to_numpy(dtype=object),
        category=out["c"].to_numpy(dtype=object) if by_category else None,
        ts_us=out["t"].to_numpy(dtype=np.int64),
        amount=out["a"].to_numpy(dtype=np.float64),
    )


def _member_codes(members: pd.DataFrame) -> tuple[pd.Index, np.ndarray]:
    """Members' ids (an index, position = code) and their join times (int64 us)."""
    what = "members"
    _check_columns(members, [C.MEMBER_ID, C.JOINED_AT], what)
    ids = members[C.MEMBER_ID].astype(str)
    dup = ids.duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise ValueError(f"{what}: row {row}, column {C.MEMBER_ID!r}: member {ids.iloc[row]!r} appears twice "
                         f"(key {MEMBERS.key})")
    return pd.Index(ids.to_numpy()), _utc_us(members[C.JOINED_AT], what, C.JOINED_AT)


def _codes_for(index: pd.Index, member_id: np.ndarray, transactions: pd.DataFrame) -> np.ndarray:
    codes = index.get_indexer(member_id)
    if (codes < 0).any():
        unknown = member_id[codes < 0]
        first = str(unknown[0])
        row = int(np.flatnonzero(transactions[C.MEMBER_ID].astype(str).to_numpy() == first)[0])
        raise ValueError(f"transactions: {len(set(unknown))} member(s) have orders but are absent from the "
                         f"members table, e.g. row {row}, column {C.MEMBER_ID!r} = {first!r}")
    return codes.astype(np.int64)


# --- the timeline: vectorised 'first event at or after t' and 'events in [t1, t2)' per group --------------


class _Timeline:
    """Events sorted by (group, time) with a combined int64 key, so that per-group searches are one
    ``np.searchsorted`` over all groups at once. Times are kept at second resolution in the key (all window
    bounds are midnights, so flooring to seconds never moves an event across a bound) and at microsecond
    resolution for durations."""

    def __init__(self, group: np.ndarray, ts_us: np.ndarray, amount: np.ndarray, n_groups: int) -> None:
        order = np.lexsort((ts_us, group))
        self.group = group[order]
        self.ts_us = ts_us[order]
        secs = np.floor_divide(self.ts_us, 1_000_000)
        self.t0 = int(secs.min()) if len(secs) else 0
        self.stride = (int(secs.max()) - self.t0 + 2) if len(secs) else 2
        if n_groups * self.stride >= 2**62:
            raise ValueError(f"{n_groups} groups over {self.stride / _S_PER_DAY:.0f} days do not fit the "
                             "int64 search key; split the members into chunks")
        self.key = self.group * self.stride + (secs - self.t0)
        self.cum_amount = np.concatenate([[0.0], np.cumsum(amount[order])])
        self.group_start = np.searchsorted(self.group, np.arange(n_groups + 1), side="left")

    def position(self, groups: np.ndarray, t_us: int) -> np.ndarray:
        """Index of each group's first event at or after ``t_us`` (a whole second)."""
        off = min(max(t_us // 1_000_000 - self.t0, 0), self.stride - 1)
        return np.searchsorted(self.key, groups * self.stride + off, side="left")

    def next_event(self, groups: np.ndarray, start_us: int, end_us: int) -> tuple[np.ndarray, np.ndarray]:
        """(event, days) from ``start_us`` to each group's first event in ``[start_us, end_us)``; without one,
        days to ``end_us`` (censored)."""
        pos = self.position(groups, start_us)
        has = pos < self.group_start[groups + 1]
        padded = np.append(self.ts_us, end_us)  # pos may point one past the last event
        t_next = np.where(has, padded[pos], end_us)
        event = has & (t_next < end_us)
        days = (np.where(event, t_next, end_us) - start_us) / _US_PER_DAY
        return event, days

    def count_and_sum(self, groups: np.ndarray, start_us: int, stop_us: int) -> tuple[np.ndarray, np.ndarray]:
        """Number of events and their total amount in ``[start_us, stop_us)`` per group."""
        lo = self.position(groups, start_us)
        hi = self.position(groups, stop_us)
        return hi - lo, self.cum_amount[hi] - self.cum_amount[lo]

    def has_before(self, groups: np.ndarray, t_us: int) -> np.ndarray:
        return self.position(groups, t_us) > self.group_start[groups]


def _cutoffs_us(cutoffs: Sequence[date], end_excl_us: int) -> list[int]:
    if len(cutoffs) == 0:
        raise ValueError("cutoffs: give at least one cutoff date")
    out = sorted({_midnight_us(c, "cutoff") for c in cutoffs})
    late = [c for c in out if c >= end_excl_us]
    if late:
        raise ValueError(f"cutoff {_as_utc(late[0]).date()} is after the end of the data "
                         f"({_as_utc(end_excl_us - _US_PER_DAY).date()}): nothing after it can be labelled")
    return out


def _end_exclusive_us(end: date | None, ts_us: np.ndarray) -> int:
    if end is not None:
        return _midnight_us(end, "end") + _US_PER_DAY
    if len(ts_us) == 0:
        raise ValueError("transactions: empty, so the end of the data is unknown; pass end=")
    last_day = int(ts_us.max()) // _US_PER_DAY * _US_PER_DAY
    return last_day + _US_PER_DAY


# --- public API -------------------------------------------------------------------------------------------


def build_labels(transactions: pd.DataFrame, members: pd.DataFrame, cutoffs: Sequence[date],
                 settings: Settings, end: date | None = None, spend_days: int | None = None) -> pd.DataFrame:
    """One row per (member, cutoff) for members who joined before the cutoff, with every member label.

    ``end`` is the last day covered by the data (inclusive); by default the UTC date of the latest line.
    Columns: ``member_id``, ``L.CUTOFF`` (UTC midnight), ``L.CHURN`` (Int8, <NA> when not observable),
    ``L.LABEL_OBSERVABLE``, ``L.ORDERS_NEXT_H`` (Int64), ``L.DAYS_TO_NEXT`` (float days),
    ``L.NEXT_EVENT``, ``L.SPEND_NEXT``, ``L.SPEND_OBSERVABLE``; sorted by cutoff then member.
    ``spend_days`` is the spend window (default ``settings.training.value_horizon_days``).
    ``df.attrs`` holds ``horizon_days``, ``spend_days`` and ``end``.
    """
    horizon = settings.lifecycle.horizon_days
    spend_days = settings.training.value_horizon_days if spend_days is None else int(spend_days)
    if spend_days < 1:
        raise ValueError(f"spend_days must be at least 1, got {spend_days}")
    _check_columns(transactions, TRANSACTIONS.required, "transactions")
    index, joined_us = _member_codes(members)
    orders = _purchase_orders(transactions, by_category=False)
    codes = _codes_for(index, orders.member_id, transactions)
    all_ts = _utc_us(transactions[C.TS], "transactions", C.TS)
    end_excl = _end_exclusive_us(end, all_ts)
    cut_list = _cutoffs_us(cutoffs, end_excl)
    keep = orders.ts_us < end_excl  # orders after a given end do not exist for labelling
    timeline = _Timeline(codes[keep], orders.ts_us[keep], orders.amount[keep], len(index))

    frames = []
    for cut in cut_list:
        groups = np.flatnonzero(joined_us < cut).astype(np.int64)
        event, days = timeline.next_event(groups, cut, end_excl)
        h_stop = cut + horizon * _US_PER_DAY
        n_h, _ = timeline.count_and_sum(groups, cut, h_stop)
        y_stop = cut + spend_days * _US_PER_DAY
        _, spend = timeline.count_and_sum(groups, cut, y_stop)
        observable = h_stop <= end_excl
        spend_observable = y_stop <= end_excl
        n = len(groups)
        frames.append(pd.DataFrame({
            C.MEMBER_ID: index.to_numpy()[groups],
            L.CUTOFF: np.full(n, cut, dtype=np.int64),
            L.CHURN: pd.array((n_h == 0).astype(np.int8) if observable else [pd.NA] * n, dtype="Int8"),
            L.LABEL_OBSERVABLE: np.full(n, observable),
            L.ORDERS_NEXT_H: pd.array(n_h if observable else [pd.NA] * n, dtype="Int64"),
            L.DAYS_TO_NEXT: days,
            L.NEXT_EVENT: event,
            L.SPEND_NEXT: spend if spend_observable else np.full(n, np.nan),
            L.SPEND_OBSERVABLE: np.full(n, spend_observable),
        }))
        log.info("labels at %s: %d members, churn observable %s, churn rate %s", _as_utc(cut).date(), n,
                 observable, f"{(n_h == 0).mean():.3f}" if observable and n else "n/a")
    out = pd.concat(frames, ignore_index=True)
    out[L.CUTOFF] = _as_utc(out[L.CUTOFF].to_numpy())
    out = out.sort_values([L.CUTOFF, C.MEMBER_ID], kind="stable", ignore_index=True)
    out.attrs.update(horizon_days=horizon, spend_days=spend_days, end=_as_utc(end_excl - _US_PER_DAY).date())
    return out


def replenishable_categories(items: pd.DataFrame) -> list[str]:
    """Categories in which at least one item is flagged replenishable (items table of the contract)."""
    _check_columns(items, [C.CATEGORY, C.REPLENISHABLE], "items")
    flagged = items[items[C.REPLENISHABLE].fillna(False).astype(bool)]
    return sorted(flagged[C.CATEGORY].dropna().astype(str).unique().tolist())


def build_category_labels(transactions: pd.DataFrame, members: pd.DataFrame, cutoffs: Sequence[date],
                          categories: Collection[str], end: date | None = None) -> pd.DataFrame:
    """Days to the next purchase in each category, per (member, category, cutoff), censored at the end.

    One row for every member who joined before the cutoff and bought in the category before it (the pairs
    of the member x category feature view), for each category in ``categories`` (usually
    :func:`replenishable_categories`). An order counts as a purchase in a category when one of its
    non-return lines is in it. Columns: ``member_id``, ``category``, ``L.CUTOFF``, ``L.CAT_DAYS_TO_NEXT``,
    ``L.CAT_NEXT_EVENT``.
    """
    index, joined_us = _member_codes(members)
    all_ts = _utc_us(transactions[C.TS], "transactions", C.TS)
    end_excl = _end_exclusive_us(end, all_ts)
    cut_list = _cutoffs_us(cutoffs, end_excl)
    cats = {str(c) for c in categories}
    columns = [C.MEMBER_ID, C.CATEGORY, L.CUTOFF, L.CAT_DAYS_TO_NEXT, L.CAT_NEXT_EVENT]
    orders = _purchase_orders(transactions, by_category=True)
    codes = _codes_for(index, orders.member_id, transactions)
    keep = np.isin(orders.category, list(cats)) & (orders.ts_us < end_excl)
    if not keep.any():
        out = pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
        out[L.CUTOFF] = pd.Series(dtype="datetime64[us, UTC]")
        return out
    pair_member = codes[keep]
    pair_cat = orders.category[keep]
    pair, uniques = pd.factorize(pd.MultiIndex.from_arrays([pair_member, pair_cat]))
    pair = pair.astype(np.int64)
    n_pairs = len(uniques)
    timeline = _Timeline(pair, orders.ts_us[keep], orders.amount[keep], n_pairs)
    pair_member_code = uniques.get_level_values(0).to_numpy(dtype=np.int64)
    pair_category = uniques.get_level_values(1).to_numpy(dtype=object)
    all_pairs = np.arange(n_pairs, dtype=np.int64)

    frames = []
    for cut in cut_list:
        eligible = timeline.has_before(all_pairs, cut) & (joined_us[pair_member_code] < cut)
        groups = all_pairs[eligible]
        event, days = timeline.next_event(groups, cut, end_excl)
        frames.append(pd.DataFrame({
            C.MEMBER_ID: index.to_numpy()[pair_member_code[groups]],
            C.CATEGORY: pair_category[groups],
            L.CUTOFF: np.full(len(groups), cut, dtype=np.int64),
            L.CAT_DAYS_TO_NEXT: days,
            L.CAT_NEXT_EVENT: event,
        }))
    out = pd.concat(frames, ignore_index=True)
    out[L.CUTOFF] = _as_utc(out[L.CUTOFF].to_numpy())
    out = out.sort_values([L.CUTOFF, C.MEMBER_ID, C.CATEGORY], kind="stable", ignore_index=True)
    out.attrs.update(end=_as_utc(end_excl - _US_PER_DAY).date())
    return out


def split_calibration_holdout(transactions: pd.DataFrame, cutoff: date, holdout_end: date, *,
                              unit_days: float = 1.0) -> pd.DataFrame:
    """(frequency, recency, T) in the calibration period and purchases in the holdout, per member.

    Calibration is ``ts < cutoff``; the holdout is ``cutoff <= ts`` up to the end of ``holdout_end``
    (inclusive last day). As in the BTYD literature (Fader, Hardie & Lee 2005; lifetimes), purchases are
    counted per day: several orders of one member on one day are one purchase. Times are in units of
    ``unit_days`` (7 for weeks): recency = last minus first purchase day, T = last calibration day minus
    first purchase day. One row per member with a purchase in the calibration period, indexed by
    ``member_id``, with the ``L.*_CAL`` and ``L.*_HOLDOUT`` columns.
    """
    if unit_days <= 0:
        raise ValueError(f"unit_days must be positive, got {unit_days}")
    cut = _midnight_us(cutoff, "cutoff")
    hold_excl = _midnight_us(holdout_end, "holdout_end") + _US_PER_DAY
    if hold_excl <= cut:
        raise ValueError(f"holdout_end {holdout_end} must not be before cutoff {cutoff}")
    orders = _purchase_orders(transactions, by_category=False)
    day = orders.ts_us // _US_PER_DAY
    frame = pd.DataFrame({C.MEMBER_ID: orders.member_id, "day": day, "amount": orders.amount})
    frame = frame[orders.ts_us < hold_excl]
    daily = frame.groupby([C.MEMBER_ID, "day"], sort=True, as_index=False)["amount"].sum()
    cut_day, last_cal_day = cut // _US_PER_DAY, cut // _US_PER_DAY - 1
    cal = daily[daily["day"] < cut_day]
    hold = daily[daily["day"] >= cut_day]
    g = cal.groupby(C.MEMBER_ID, sort=True)
    first = g["day"].min()
    n = g["day"].size()
    total = g["amount"].sum()
    first_amount = g["amount"].first()
    freq = n - 1
    out = pd.DataFrame({
        L.FREQUENCY_CAL: freq.astype(np.int64),
        L.RECENCY_CAL: (g["day"].max() - first) / unit_days,
        L.T_CAL: (last_cal_day - first) / unit_days,
        L.MONETARY_CAL: np.where(freq > 0, (total - first_amount) / freq.clip(lower=1), 0.0),
    })
    hg = hold[hold[C.MEMBER_ID].isin(out.index)].groupby(C.MEMBER_ID)
    out[L.FREQUENCY_HOLDOUT] = hg["day"].size().reindex(out.index, fill_value=0).astype(np.int64)
    hold_total = hg["amount"].sum().reindex(out.index, fill_value=0.0)
    out[L.MONETARY_HOLDOUT] = np.where(out[L.FREQUENCY_HOLDOUT] > 0,
                                       hold_total / out[L.FREQUENCY_HOLDOUT].clip(lower=1), 0.0)
    out[L.DURATION_HOLDOUT] = (hold_excl - cut) / _US_PER_DAY / unit_days
    out.index.name = C.MEMBER_ID
    return out

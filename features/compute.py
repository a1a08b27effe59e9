"""Member, member x category and item features as of any date: one implementation, portable SQL.

Everything in a row with ``as_of = D`` is computed from transactions with ``ts < D`` only (D is the UTC
midnight that starts day D). The definitions are a few SQL steps (:func:`feature_steps`), written in the
DuckDB dialect but restricted to portable SQL (CTEs, GROUP BY, window functions, CASE); the one dialect
function, ``EPOCH_US`` (microseconds since the epoch, cheap in DuckDB where ``DATE_DIFF`` on a
TIMESTAMPTZ goes through ICU and is ~100x slower), is mapped to Spark's ``UNIX_MICROS`` by
:func:`feature_sql`, which transpiles every step with sqlglot (``feature_sql(s, D, dialect="spark")``).
Steps whose name starts with ``_`` are intermediate relations (temporary tables in DuckDB, or views
where ``Step.materialize`` is false; temporary views or cached DataFrames on Spark); the others are the
snapshot views. Source relations are named ``transactions``, ``members`` and ``items`` (the contract's
table names).

Cost (1M members, ~20M lines, 2 cores): the line table is a view (re-scanned by its three users rather
than stored); members and categories get integer keys (``_mk``, ``_ck``, ranks of the names) before the
large group-bys, windows and sorts, which are several times cheaper on integers than on strings; the
member x category gaps come from one window per member ordered by (category, time) instead of one per
member and category; the member's last gap comes from an aggregate instead of a second window.

Definitions (days are fractional unless said otherwise; a window of N days is ``D - N days <= ts < D``):

- purchase line: ``is_return`` false or null; return line: ``is_return`` true (negative amount).
- an order is a purchase ``order_id`` of the member; its time is the earliest of its lines' ``ts``.
  Return lines never make an order.
- ``tenure_days``: whole days from ``joined_at`` to D. Only members with ``joined_at < D`` are in
  snapshot D; members who never bought are in it with counts 0, spend 0 and undefined (NaN) ratios.
- ``recency_days`` / ``days_since_first_purchase``: from the latest / earliest order time to D.
- ``orders_total``, ``orders_Nd``: orders (in the window).
- ``spend_total``, ``spend_Nd``, ``spend_prev_90d``: net amount, i.e. purchase amounts plus the
  (negative) return amounts of lines in the window; ``spend_prev_90d`` covers ``D-180d <= ts < D-90d``.
- ``spend_trend_90d``: net spend of the last 90 days / ``spend_prev_90d`` - 1; NaN when the previous
  spend is 0 or negative (a ratio to a negative spend has no meaning).
- ``avg_order_value``: purchased amount (purchase lines only) / orders.
- ``gap_mean_days`` / ``gap_std_days``: mean and sample standard deviation (n-1) of the gaps between
  consecutive distinct order times; NaN with fewer than 2 (mean) or 3 (std) distinct order times.
- ``recency_gap_ratio``: recency_days / gap_mean_days (NaN when the mean gap is undefined or 0).
- ``basket_size_mean``: mean number of distinct items per order.
- ``n_categories``, ``top_category``, ``top_category_share``, ``category_entropy``: over the
  purchased amount per category (purchase lines; returns ignored); the top category is the one with the
  largest purchased amount, ties broken by the category name; entropy in nats, ``-sum p ln p``.
- ``discount_share``: discount / (amount + discount) over purchase lines.
- ``return_share``: returned amount (minus the sum of return-line amounts) / purchased amount.
- ``replenishable_share``: purchased amount on items flagged replenishable / purchased amount.
- ``rfm_*``, ``rfm_segment``, ``lifecycle_stage``: the rule of :mod:`features.segments`.
- category of a line: its own, else the item's, else ``unknown``.
- member x category (one row per member and category with a purchase before D): ``cat_orders`` orders
  containing the category, ``cat_spend_share`` its share of the member's purchased amount, recency and
  gaps as above over the orders containing the category, ``cat_due_ratio = cat_recency_days /
  cat_gap_mean_days``, ``cat_replenishable`` true when any catalogue item of the category is.
- items (every catalogue item, plus any item sold but absent from the catalogue): ``item_buyers_30d``
  distinct members who bought it in the last 30 days, ``item_orders_90d`` orders containing it in the
  last 90 days, ``item_repeat_rate`` share of its buyers (all time before D) who bought it in more than one
  order, and the catalogue's price, category (for an item absent from the catalogue: the largest category
  name among its lines) and replenishable flag (false when absent).

Notes: member views use the transactions of the snapshot's members only (a transaction of a member who
joins later is counted in the item view, not in a member row); counts rely on the unique contract key
(order_id, item_id, is_return) that ingest enforces; float sums may differ in the last bits when the
lake's rows are laid out differently (summation order), never more.

Example::

    from features.compute import compute_features, default_snapshot_dates, member_features_frame
    compute_features(settings, default_snapshot_dates(settings, date(2025, 1, 1)))
    frame = member_features_frame(settings, "2025-01-01")     # the same rows, nothing written
"""

from __future__ import annotations

import glob
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import sqlglot
from sqlglot import exp

from features.contract import (
    FC,
    FI,
    ITEM_FEATURE_SCHEMA,
    ITEMS,
    MEMBER_CATEGORY_FEATURE_SCHEMA,
    MEMBERS,
    TRANSACTIONS,
    C,
    DType,
    F,
    Table,
    member_feature_schema,
)
from features.lake import (
    FEATURE_VIEWS,
    ITEM_VIEW,
    MEMBER_CATEGORY_VIEW,
    MEMBER_VIEW,
    atomic_path,
    connect_duckdb,
    snapshot_path,
    table_glob,
)
from features.segments import SegmentInput, segment_sql
from features.settings import Settings

logger = logging.getLogger(__name__)

UNKNOWN_CATEGORY = "unknown"
DAY_US = 86_400_000_000
_EPOCH = date(1970, 1, 1)

# intermediate column names (never leave this module)
_AGE = "_age_us"  # microseconds from the line's ts (or the order's time) to D
_REPL = "_repl"
_N_ITEMS = "_n_items"
_GAP = "_gap_us"
_MK = "_mk"  # integer member key of the snapshot (ranks member_id): cheaper to group, join and sort on
_CK = "_ck"  # integer category key (ranks the category name), for the same reason

_ARROW: dict[DType, pa.DataType] = {"string": pa.string(), "timestamp": pa.timestamp("us", tz="UTC"),
                                    "float": pa.float64(), "int": pa.int64(), "bool": pa.bool_()}
_SQL: dict[DType, str] = {"string": "VARCHAR", "timestamp": "TIMESTAMPTZ", "float": "DOUBLE",
                          "int": "BIGINT", "bool": "BOOLEAN"}

ProgressFn = Callable[[int, int, date], None]


@dataclass(frozen=True)
class Step:
    """One SQL step: ``name`` is the relation it defines (``_``-prefixed: intermediate)."""

    name: str
    sql: str
    materialize: bool = True  # False: a (temporary) view, read by the steps that use it


def _as_date(value: date | datetime | str) -> date:
    if isinstance(value, datetime):
        if value.time() != datetime.min.time():
            raise ValueError(f"as-of {value!r} is not a midnight; as-of values are dates")
        return value.date()
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"as-of {value!r} is not an ISO date (YYYY-MM-DD)") from None


def _ts_lit(d: date) -> str:
    return f"CAST('{d.isoformat()} 00:00:00+00:00' AS TIMESTAMPTZ)"


def view_schema(settings: Settings, view: str) -> dict[str, DType]:
    """Column -> type of one snapshot view, keys first, exactly as written."""
    if view == MEMBER_VIEW:
        return {C.MEMBER_ID: "string", C.AS_OF: "timestamp",
                **member_feature_schema(settings.features.windows_days)}
    if view == MEMBER_CATEGORY_VIEW:
        return {C.MEMBER_ID: "string", C.CATEGORY: "string", C.AS_OF: "timestamp",
                **MEMBER_CATEGORY_FEATURE_SCHEMA}
    if view == ITEM_VIEW:
        return {C.ITEM_ID: "string", C.AS_OF: "timestamp", **ITEM_FEATURE_SCHEMA}
    raise ValueError(f"unknown feature view {view!r}; the views are {', '.join(FEATURE_VIEWS)}")


def arrow_schema(settings: Settings, view: str) -> pa.Schema:
    return pa.schema([pa.field(n, _ARROW[t]) for n, t in view_schema(settings, view).items()])


# --- the definitions ------------------------------------------------------------------------------------

def _days(us_expr: str) -> str:
    return f"({us_expr}) / {DAY_US}.0"


def _ratio(num: str, den: str) -> str:
    """num / den, null unless den > 0."""
    return f"CASE WHEN {den} > 0 THEN {num} / {den} END"


def feature_steps(settings: Settings, as_of: date | str, views: Sequence[str] = FEATURE_VIEWS) -> list[Step]:
    """The SQL steps (DuckDB dialect, portable constructs) computing ``views`` as of ``as_of``.

    Counting lines counts distinct items or orders because the contract key of transactions,
    (order_id, item_id, is_return), is unique in the lake (ingest rejects duplicates); this avoids
    COUNT(DISTINCT), which was 3x slower here.
    """
    d = _as_date(as_of)
    for v in views:
        view_schema(settings, v)  # validates the name
    d_us = (d - _EPOCH).days * DAY_US
    d_ts = _ts_lit(d)
    m, o, i, cat, ts, amt = C.MEMBER_ID, C.ORDER_ID, C.ITEM_ID, C.CATEGORY, C.TS, C.AMOUNT
    tx, mem, it = TRANSACTIONS.name, MEMBERS.name, ITEMS.name

    # every line before D with its category and replenishable flag resolved (a view: each use scans the
    # lake again, which is cheaper than storing 20M rows)
    steps = [Step("_lines", f"""
        SELECT t.{m}, t.{o}, t.{i}, COALESCE(t.{cat}, it.{cat}, '{UNKNOWN_CATEGORY}') AS {cat},
               t.{amt}, COALESCE(t.{C.DISCOUNT}, 0.0) AS {C.DISCOUNT},
               COALESCE(t.{C.IS_RETURN}, FALSE) AS {C.IS_RETURN},
               COALESCE(it.{C.REPLENISHABLE}, FALSE) AS {_REPL},
               {d_us} - EPOCH_US(t.{ts}) AS {_AGE}
        FROM {tx} AS t LEFT JOIN {it} AS it ON t.{i} = it.{i}
        WHERE t.{ts} < {d_ts}""", materialize=False)]
    if {MEMBER_VIEW, MEMBER_CATEGORY_VIEW} & set(views):
        steps.append(Step("_base", f"""
            SELECT {m}, {C.CHANNEL}, {d_us} - EPOCH_US({C.JOINED_AT}) AS {_AGE},
                   ROW_NUMBER() OVER (ORDER BY {m}) AS {_MK}
            FROM {mem} WHERE {C.JOINED_AT} < {d_ts}"""))
        # every category a line can resolve to (its own, the item's, unknown), keyed in name order
        steps.append(Step("_cats", f"""
            SELECT {cat}, ROW_NUMBER() OVER (ORDER BY {cat}) AS {_CK}
            FROM (SELECT {cat} FROM {tx} WHERE {ts} < {d_ts} AND {cat} IS NOT NULL
                  UNION SELECT {cat} FROM {it} WHERE {cat} IS NOT NULL
                  UNION SELECT '{UNKNOWN_CATEGORY}' AS {cat}) AS _c"""))
        # member x order x category, purchase lines of the members in the snapshot
        steps.append(Step("_mco", f"""
            SELECT b.{_MK}, l.{o}, c.{_CK}, MAX(l.{_AGE}) AS {_AGE}, SUM(l.{amt}) AS {amt},
                   COUNT(*) AS {_N_ITEMS}
            FROM _lines AS l JOIN _base AS b ON l.{m} = b.{m} JOIN _cats AS c ON l.{cat} = c.{cat}
            WHERE NOT l.{C.IS_RETURN}
            GROUP BY b.{_MK}, l.{o}, c.{_CK}"""))
        # member x category: orders, purchased amount, recency and gaps between distinct order times
        # (equal times sort next to each other and give gaps of 0, which are not gaps between distinct times).
        # One window per member ordered by category then time (much cheaper than one per member and
        # category); a row's gap is to the next row of the same category.
        w = f"OVER (PARTITION BY {_MK} ORDER BY {_CK}, {_AGE})"
        steps.append(Step("_mc", f"""
            SELECT {_MK}, {_CK}, COUNT(*) AS {FC.CAT_ORDERS}, SUM({amt}) AS {amt}, MIN({_AGE}) AS {_AGE},
                   AVG(CASE WHEN {_GAP} > 0 THEN CAST({_GAP} AS DOUBLE) END) AS _gap_mean,
                   STDDEV_SAMP(CASE WHEN {_GAP} > 0 THEN CAST({_GAP} AS DOUBLE) END) AS _gap_std
            FROM (SELECT {_MK}, {_CK}, {amt}, {_AGE},
                         CASE WHEN LEAD({_CK}) {w} = {_CK} THEN LEAD({_AGE}) {w} - {_AGE} END AS {_GAP}
                  FROM _mco) AS _g
            GROUP BY {_MK}, {_CK}"""))
    if MEMBER_VIEW in views:
        steps.append(Step(MEMBER_VIEW, _member_sql(settings, d_ts)))
    if MEMBER_CATEGORY_VIEW in views:
        steps.append(Step(MEMBER_CATEGORY_VIEW, _member_category_sql(d_ts)))
    if ITEM_VIEW in views:
        steps.append(Step(ITEM_VIEW, _item_sql(d_ts)))
    return steps


def _member_sql(settings: Settings, d_ts: str) -> str:
    m, o, cat, amt = C.MEMBER_ID, C.ORDER_ID, C.CATEGORY, C.AMOUNT
    windows = settings.features.windows_days
    ret = C.IS_RETURN
    orders_w = ", ".join(f"COUNT(CASE WHEN {_AGE} <= {w * DAY_US} THEN 1 END) AS {F.orders(w)}"
                         for w in windows)
    spend_w = ", ".join(f"SUM(CASE WHEN {_AGE} <= {w * DAY_US} THEN {amt} ELSE 0 END) AS {F.spend(w)}"
                        for w in windows)
    d90, d180 = 90 * DAY_US, 180 * DAY_US
    rfm_us = settings.rfm.window_days * DAY_US
    purchased = "ml._purchased"
    gap_mean, recency = "mo._gap_mean", "mo._recency_us"
    feats = {
        F.TENURE_DAYS: f"CAST(FLOOR(b.{_AGE} / {DAY_US}.0) AS BIGINT)",
        F.RECENCY_DAYS: _days(recency),
        F.FIRST_PURCHASE_DAYS: _days("mo._first_us"),
        F.ORDERS_TOTAL: f"COALESCE(mo.{F.ORDERS_TOTAL}, 0)",
        F.SPEND_TOTAL: f"COALESCE(ml.{F.SPEND_TOTAL}, 0)",
        **{F.orders(w): f"COALESCE(mo.{F.orders(w)}, 0)" for w in windows},
        **{F.spend(w): f"COALESCE(ml.{F.spend(w)}, 0)" for w in windows},
        F.AVG_ORDER_VALUE: _ratio("mo._order_amount", f"mo.{F.ORDERS_TOTAL}"),
        F.GAP_MEAN_DAYS: _days(gap_mean),
        F.GAP_STD_DAYS: _days("mo._gap_std"),
        F.RECENCY_GAP_RATIO: _ratio(f"CAST({recency} AS DOUBLE)", gap_mean),
        F.SPEND_PREV_90D: "COALESCE(ml._spend_prev, 0)",
        F.SPEND_TREND_90D: "CASE WHEN ml._spend_prev > 0 THEN ml._spend_90 / ml._spend_prev - 1 END",
        F.BASKET_SIZE_MEAN: f"mo.{F.BASKET_SIZE_MEAN}",
        F.N_CATEGORIES: f"COALESCE(mt.{F.N_CATEGORIES}, 0)",
        F.TOP_CATEGORY: f"mtop.{F.TOP_CATEGORY}",
        F.TOP_CATEGORY_SHARE: _ratio("mt._top_amount", "mt._total"),
        # -sum p ln p with p = a / T, as one pass: (ln T * sum a - sum a ln a) / T over a > 0
        F.CATEGORY_ENTROPY: "CASE WHEN mt._total > 0 THEN GREATEST(0.0, (LN(mt._total) * mt._positive - "
                            "mt._a_ln_a) / mt._total) END",
        F.DISCOUNT_SHARE: _ratio("ml._discount", f"({purchased} + ml._discount)"),
        F.RETURN_SHARE: _ratio("ml._returned", purchased),
        F.REPLENISHABLE_SHARE: _ratio("ml._repl_amount", purchased),
        F.CHANNEL: f"b.{C.CHANNEL}",
        SegmentInput.RFM_ORDERS: "COALESCE(mo._rfm_orders, 0)",
        SegmentInput.RFM_SPEND: "COALESCE(ml._rfm_spend, 0)",
        SegmentInput.LAST_GAP_DAYS: _days(f"COALESCE(mo._last_gap, b.{_AGE} - {recency})"),
    }
    columns = [c for c in view_schema(settings, MEMBER_VIEW) if c != C.AS_OF]
    return f"""
    WITH _orders AS (
        SELECT {_MK}, {o}, MAX({_AGE}) AS {_AGE}, SUM({amt}) AS {amt}, SUM({_N_ITEMS}) AS {_N_ITEMS}
        FROM _mco GROUP BY {_MK}, {o}
    ), _og AS (
        SELECT {_MK}, {_AGE}, {amt}, {_N_ITEMS},
               LEAD({_AGE}) OVER (PARTITION BY {_MK} ORDER BY {_AGE}) - {_AGE} AS {_GAP}
        FROM _orders
    ), mo AS (
        SELECT {_MK}, COUNT(*) AS {F.ORDERS_TOTAL}, {orders_w},
               COUNT(CASE WHEN {_AGE} <= {rfm_us} THEN 1 END) AS _rfm_orders,
               MIN({_AGE}) AS _recency_us, MAX({_AGE}) AS _first_us, SUM({amt}) AS _order_amount,
               AVG(CAST({_N_ITEMS} AS DOUBLE)) AS {F.BASKET_SIZE_MEAN},
               AVG(CASE WHEN {_GAP} > 0 THEN CAST({_GAP} AS DOUBLE) END) AS _gap_mean,
               STDDEV_SAMP(CASE WHEN {_GAP} > 0 THEN CAST({_GAP} AS DOUBLE) END) AS _gap_std,
               -- the gap after the latest order time: the second smallest distinct age minus the smallest
               MIN(CASE WHEN {_GAP} > 0 THEN {_AGE} + {_GAP} END) - MIN({_AGE}) AS _last_gap
        FROM _og GROUP BY {_MK}
    ), ml AS (
        SELECT {m}, SUM({amt}) AS {F.SPEND_TOTAL}, {spend_w},
               SUM(CASE WHEN {_AGE} <= {d90} THEN {amt} ELSE 0 END) AS _spend_90,
               SUM(CASE WHEN {_AGE} > {d90} AND {_AGE} <= {d180} THEN {amt} ELSE 0 END) AS _spend_prev,
               SUM(CASE WHEN {_AGE} <= {rfm_us} THEN {amt} ELSE 0 END) AS _rfm_spend,
               SUM(CASE WHEN NOT {ret} THEN {amt} ELSE 0 END) AS _purchased,
               SUM(CASE WHEN {ret} THEN -{amt} ELSE 0 END) AS _returned,
               SUM(CASE WHEN NOT {ret} THEN {C.DISCOUNT} ELSE 0 END) AS _discount,
               SUM(CASE WHEN NOT {ret} AND {_REPL} THEN {amt} ELSE 0 END) AS _repl_amount
        FROM _lines GROUP BY {m}
    ), mt AS (
        SELECT {_MK}, COUNT(*) AS {F.N_CATEGORIES}, SUM({amt}) AS _total, MAX({amt}) AS _top_amount,
               SUM(CASE WHEN {amt} > 0 THEN {amt} ELSE 0 END) AS _positive,
               SUM(CASE WHEN {amt} > 0 THEN {amt} * LN({amt}) ELSE 0 END) AS _a_ln_a
        FROM _mc GROUP BY {_MK}
    ), mtop AS (
        SELECT t.{_MK}, k.{cat} AS {F.TOP_CATEGORY}
        FROM (SELECT c.{_MK}, MIN(c.{_CK}) AS {_CK}
              FROM _mc AS c JOIN mt ON c.{_MK} = mt.{_MK} AND c.{amt} = mt._top_amount GROUP BY c.{_MK}) AS t
             JOIN _cats AS k ON t.{_CK} = k.{_CK}
    ), _inputs AS (
        SELECT b.{m}, b.{_MK}, {", ".join(f"{e} AS {n}" for n, e in feats.items())}
        FROM _base AS b LEFT JOIN mo ON b.{_MK} = mo.{_MK} LEFT JOIN ml ON b.{m} = ml.{m}
             LEFT JOIN mt ON b.{_MK} = mt.{_MK} LEFT JOIN mtop ON b.{_MK} = mtop.{_MK}
    )
    SELECT {columns[0]}, {d_ts} AS {C.AS_OF}, {", ".join(columns[1:])}
    FROM ({segment_sql(settings, "_inputs")}) AS _seg ORDER BY {_MK}"""


def _member_category_sql(d_ts: str) -> str:
    m, cat, amt = C.MEMBER_ID, C.CATEGORY, C.AMOUNT
    return f"""
    WITH t AS (
        SELECT {_MK}, SUM({amt}) AS _total FROM _mc GROUP BY {_MK}
    ), r AS (
        SELECT {cat}, MAX(CASE WHEN {C.REPLENISHABLE} THEN 1 ELSE 0 END) AS _repl
        FROM {ITEMS.name} GROUP BY {cat}
    )
    SELECT b.{m}, k.{cat}, {d_ts} AS {C.AS_OF}, c.{FC.CAT_ORDERS},
           {_ratio(f"c.{amt}", "t._total")} AS {FC.CAT_SPEND_SHARE},
           {_days(f"c.{_AGE}")} AS {FC.CAT_RECENCY_DAYS},
           {_days("c._gap_mean")} AS {FC.CAT_GAP_MEAN_DAYS}, {_days("c._gap_std")} AS {FC.CAT_GAP_STD_DAYS},
           {_ratio(f"CAST(c.{_AGE} AS DOUBLE)", "c._gap_mean")} AS {FC.CAT_DUE_RATIO},
           COALESCE(r._repl, 0) = 1 AS {FC.CAT_REPLENISHABLE}
    FROM _mc AS c JOIN t ON c.{_MK} = t.{_MK} JOIN _base AS b ON c.{_MK} = b.{_MK}
         JOIN _cats AS k ON c.{_CK} = k.{_CK} LEFT JOIN r ON k.{cat} = r.{cat}
    ORDER BY c.{_MK}, c.{_CK}"""


def _item_sql(d_ts: str) -> str:
    m, i, cat = C.MEMBER_ID, C.ITEM_ID, C.CATEGORY
    return f"""
    WITH im AS (
        SELECT {i}, {m}, COUNT(*) AS _orders, MIN({_AGE}) AS {_AGE},
               COUNT(CASE WHEN {_AGE} <= {90 * DAY_US} THEN 1 END) AS _orders_90, MAX({cat}) AS {cat}
        FROM _lines WHERE NOT {C.IS_RETURN} GROUP BY {i}, {m}
    ), ia AS (
        SELECT {i}, COUNT(CASE WHEN {_AGE} <= {30 * DAY_US} THEN 1 END) AS {FI.ITEM_BUYERS_30D},
               SUM(_orders_90) AS {FI.ITEM_ORDERS_90D}, COUNT(*) AS _buyers,
               COUNT(CASE WHEN _orders > 1 THEN 1 END) AS _repeaters, MAX({cat}) AS {cat}
        FROM im GROUP BY {i}
    )
    SELECT COALESCE(it.{i}, ia.{i}) AS {i}, {d_ts} AS {C.AS_OF},
           COALESCE(ia.{FI.ITEM_BUYERS_30D}, 0) AS {FI.ITEM_BUYERS_30D},
           COALESCE(ia.{FI.ITEM_ORDERS_90D}, 0) AS {FI.ITEM_ORDERS_90D},
           {_ratio("CAST(ia._repeaters AS DOUBLE)", "ia._buyers")} AS {FI.ITEM_REPEAT_RATE},
           it.{C.PRICE} AS {FI.ITEM_PRICE}, COALESCE(it.{cat}, ia.{cat}) AS {FI.ITEM_CATEGORY},
           COALESCE(it.{C.REPLENISHABLE}, FALSE) AS {FI.ITEM_REPLENISHABLE}
    FROM {ITEMS.name} AS it FULL OUTER JOIN ia ON it.{i} = ia.{i}
    ORDER BY 1"""



def _to_spark(node: exp.Expression) -> exp.Expression:
    if isinstance(node, exp.Anonymous) and node.name.upper() == "EPOCH_US":
        return exp.Anonymous(this="UNIX_MICROS", expressions=node.expressions)
    return node


def feature_sql(settings: Settings, as_of: date | str, dialect: str = "duckdb",
                views: Sequence[str] = FEATURE_VIEWS) -> list[Step]:
    """:func:`feature_steps` in ``dialect`` (any sqlglot dialect; ``spark`` maps EPOCH_US to UNIX_MICROS)."""
    steps = feature_steps(settings, as_of, views)
    if dialect == "duckdb":
        return steps
    out = []
    for s in steps:
        tree = sqlglot.parse_one(s.sql, read="duckdb")
        if dialect in ("spark", "spark2", "databricks"):
            tree = tree.transform(_to_spark)
        out.append(Step(s.name, tree.sql(dialect=dialect, unsupported_level=sqlglot.ErrorLevel.RAISE), s.materialize))
    return out


# --- running on DuckDB ----------------------------------------------------------------------------------

def source_columns(table: Table, present: set[str], types: Mapping[DType, str], where: str,
                   quote: str = "") -> list[str]:
    """SELECT expressions giving ``table``'s contract columns cast to the engine's ``types``, absent optional
    columns as typed nulls; a missing required column is an error naming ``where`` (the files read)."""
    cols = []
    for c in table.columns:
        name = f"{quote}{c.name}{quote}"
        if c.name in present:
            cols.append(f"CAST({name} AS {types[c.dtype]}) AS {name}")
        elif c.required:
            raise ValueError(f"lake table {table.name!r} ({where}) lacks required column {c.name!r}")
        else:
            cols.append(f"CAST(NULL AS {types[c.dtype]}) AS {name}")
    return cols


def _source_view(con: duckdb.DuckDBPyConnection, settings: Settings, table: Table) -> None:
    pattern = table_glob(settings, table.name)
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"lake table {table.name!r} has no files matching {pattern}; "
                                "run ingest first")
    hive = table is TRANSACTIONS
    reader = (f"read_parquet({[str(f) for f in files]!r}, union_by_name = true, hive_partitioning = {hive}"
              + (", hive_types_autocast = false" if hive else "") + ")")
    present = {r[0] for r in con.sql(f"DESCRIBE SELECT * FROM {reader}").fetchall()}
    cols = source_columns(table, present, _SQL, pattern)
    con.execute(f"CREATE OR REPLACE TEMP VIEW {table.name} AS SELECT {', '.join(cols)} FROM {reader}")


def lake_connection(settings: Settings, threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the lake's transactions, members and items as views (UTC session)."""
    con = connect_duckdb(threads=threads)
    con.execute("SET TimeZone = 'UTC'")
    # every result that needs an order has an ORDER BY; without this, stored steps keep row order (costly)
    con.execute("SET preserve_insertion_order = false")
    for table in (TRANSACTIONS, MEMBERS, ITEMS):
        _source_view(con, settings, table)
    dup = con.sql(f"SELECT {C.ITEM_ID}, COUNT(*) FROM {ITEMS.name} GROUP BY 1 HAVING COUNT(*) > 1 "
                  "LIMIT 1").fetchall()
    if dup:
        raise ValueError(f"lake table 'items' ({table_glob(settings, 'items')}) has item_id {dup[0][0]!r} "
                         f"{dup[0][1]} times; item_id must be unique")
    return con


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast to the contract's types and turn float nulls into NaN (the contract's 'not defined')."""
    if table.column_names != schema.names:
        raise RuntimeError(f"feature query returned columns {table.column_names}, expected {schema.names}")
    cols = []
    for name, field in zip(schema.names, schema, strict=True):
        col = table.column(name).cast(field.type)
        if pa.types.is_floating(field.type) and col.null_count:
            col = pc.fill_null(col, math.nan)
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=schema)


def _run(con: duckdb.DuckDBPyConnection, settings: Settings, as_of: date,
         views: Sequence[str]) -> dict[str, pa.Table]:
    out = {}
    for step in feature_steps(settings, as_of, views):
        started = time.perf_counter()
        if step.name.startswith("_"):
            kind = "TABLE" if step.materialize else "VIEW"
            con.execute(f"CREATE OR REPLACE TEMP {kind} {step.name} AS {step.sql}")
        else:
            out[step.name] = _conform(con.sql(step.sql).to_arrow_table(), arrow_schema(settings, step.name))
        logger.debug("as of %s: step %s took %.2f s", as_of, step.name, time.perf_counter() - started)
    for step in feature_steps(settings, as_of, views):
        if step.name.startswith("_"):
            con.execute(f"DROP {'TABLE' if step.materialize else 'VIEW'} IF EXISTS {step.name}")
    return out


def compute_views(con_or_settings: duckdb.DuckDBPyConnection | Settings, as_of: date | str,
                  views: Sequence[str] = FEATURE_VIEWS,
                  settings: Settings | None = None) -> dict[str, pa.Table]:
    """The snapshot tables of ``views`` as of ``as_of``, not written anywhere.

    ``con_or_settings``: settings (the lake is read) or a DuckDB connection on which relations named
    ``transactions``, ``members`` and ``items`` exist with the contract's columns (then pass ``settings``
    too, for the windows and rules).
    """
    d = _as_date(as_of)
    if isinstance(con_or_settings, Settings):
        settings = con_or_settings
        with lake_connection(settings) as con:
            return _run(con, settings, d, views)
    if settings is None:
        raise TypeError("compute_views(con, ...) needs settings=... for the windows and the segment rules")
    return _run(con_or_settings, settings, d, views)


def member_features_frame(con_or_settings: duckdb.DuckDBPyConnection | Settings, as_of: date | str,
                          settings: Settings | None = None) -> pd.DataFrame:
    """The member snapshot as of ``as_of`` (the rows compute_features writes), as a pandas frame."""
    return compute_views(con_or_settings, as_of, (MEMBER_VIEW,), settings)[MEMBER_VIEW].to_pandas()


def default_snapshot_dates(settings: Settings, last_date: date | str) -> list[date]:
    """``last_date`` and every ``features.snapshot_every_days`` before it, back ``features.history_days``
    (inclusive), oldest first. ``last_date`` is an as-of date: its snapshot uses data before it."""
    last = _as_date(last_date)
    every, history = settings.features.snapshot_every_days, settings.features.history_days
    return [last - timedelta(days=k * every) for k in range(history // every, -1, -1)]


def compute_features(settings: Settings, as_of_dates: Sequence[date | str],
                     views: Sequence[str] = FEATURE_VIEWS,
                     progress: ProgressFn | None = None) -> dict[str, list[Path]]:
    """Compute and write the snapshots of ``views`` for every date in ``as_of_dates``.

    Each snapshot goes atomically to ``features.lake.snapshot_path(settings, view, D)``, replacing any
    earlier one (re-running a date gives the same file contents). ``progress(done, total, date)`` is
    called after each date. Returns the written paths per view, in date order. With ``features.engine:
    spark`` the same steps run on Spark and its executors write the files (``features.spark.write_views``).
    """
    dates = sorted({_as_date(d) for d in as_of_dates})
    if not dates:
        raise ValueError("compute_features: no as-of dates given")
    for v in views:
        view_schema(settings, v)
    written: dict[str, list[Path]] = {v: [] for v in views}
    with ExitStack() as stack:
        if settings.features.engine == "spark":
            from features import spark

            session = spark.spark_session(settings)
            engine = f"spark ({settings.spark.master})"

            def write_date(d: date, targets: dict[str, Path]) -> dict[str, int]:
                return spark.write_views(settings, d, targets, session)
        else:
            con = stack.enter_context(lake_connection(settings))
            engine = "duckdb"

            def write_date(d: date, targets: dict[str, Path]) -> dict[str, int]:
                rows = {}
                for view, table in _run(con, settings, d, list(targets)).items():
                    with atomic_path(targets[view]) as tmp:
                        pq.write_table(table, tmp)
                    rows[view] = table.num_rows
                return rows

        for n, d in enumerate(dates, 1):
            started = time.perf_counter()
            targets = {v: snapshot_path(settings, v, d.isoformat()) for v in views}
            rows = write_date(d, targets)
            for view in views:
                written[view].append(targets[view])
            logger.info("features as of %s on %s: %s in %.1f s", d, engine,
                        ", ".join(f"{v} {r} rows" for v, r in rows.items()), time.perf_counter() - started)
            if progress is not None:
                progress(n, len(dates), d)
    return written

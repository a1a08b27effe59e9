"""RFM segments and lifecycle stages: one rule, driven by settings, written once as portable SQL.

The rule is generated from ``settings.rfm`` and ``settings.lifecycle`` by :func:`segment_sql` and used in
two places: inside the member feature computation (``features.compute``, where it gives the snapshot
columns ``rfm_r``, ``rfm_f``, ``rfm_m``, ``rfm_segment`` and ``lifecycle_stage``) and on its own through
:func:`assign_segments`, which runs the same SQL with DuckDB over any frame holding the inputs.

Inputs (one row per member, as of a date D; see :data:`SEGMENT_INPUTS`):

- ``tenure_days``: whole days from joining to D;
- ``recency_days``: days from the last purchase to D (null/NaN when the member never bought);
- ``orders_total``: purchase orders before D;
- ``rfm_orders`` / ``rfm_spend``: purchase orders and net spend (returns subtracted) in the RFM window,
  ``D - rfm.window_days <= ts < D``;
- ``last_gap_days``: days between the latest purchase and the activity before it (the previous purchase,
  or joining when it was the first purchase).

RFM scores (``rfm.bins`` = B, default 5). Only members with at least one order in the RFM window are
scored; everyone else gets 0 in all three. Among the scored members, a value's score is
``min(B, 1 + floor(B * below / n))`` where ``n`` is the number of scored members and ``below`` the number
of scored members with a strictly worse value (for F and M: smaller ``rfm_orders`` / ``rfm_spend``; for R:
larger ``recency_days``, so 5 = bought most recently). Ties share a score and the worst value always
scores 1. The same thing in pandas: ``1 + (B * (s.rank(method="min") - 1) // n)``.

Segment, first rule that matches:

1. ``tenure_days <= lifecycle.new_member_days``: ``rfm.new_segment`` (New);
2. no purchase ever (``orders_total = 0``): ``rfm.no_purchase_segment`` (Prospect);
3. the first of ``rfm.segments`` whose r, f and m ranges all hold, where a buyer with no order in the
   RFM window is placed as if his scores were (1, 1, 1) (Lost with the default settings);
4. no segment matches: null (the settings should end with a catch-all; none is invented here).

Lifecycle stage, with ``inactive = recency_days`` for buyers and ``tenure_days`` for never-buyers, first
rule that matches:

1. ``new``: ``tenure_days <= lifecycle.new_member_days``;
2. ``churned``: ``inactive >= lifecycle.churned_days``;
3. ``dormant``: ``inactive >= lifecycle.dormant_days``;
4. ``reactivated``: ``recency_days <= lifecycle.reactivated_days`` and ``last_gap_days >=
   lifecycle.dormant_days`` (the latest purchase is recent and ended a dormant spell, including a first
   purchase made dormant_days or more after joining);
5. ``active``: everyone else (bought within dormant_days).

Example::

    from features.segments import assign_segments, segment_distribution, transition_matrix
    scored = assign_segments(inputs_frame, settings)        # adds rfm_r, ..., lifecycle_stage
    segment_distribution(snapshot, settings)                # members and share per segment and stage
    transition_matrix(snapshot_jan, snapshot_feb)           # stage in Jan x stage in Feb
"""

from __future__ import annotations

import logging

import pandas as pd
import pyarrow as pa

from features.contract import C, F
from features.lake import connect_duckdb
from features.settings import Settings

logger = logging.getLogger(__name__)


class Stage:
    """Lifecycle stage values of ``lifecycle_stage``."""

    NEW = "new"
    ACTIVE = "active"
    DORMANT = "dormant"
    CHURNED = "churned"
    REACTIVATED = "reactivated"


STAGES = (Stage.NEW, Stage.ACTIVE, Stage.REACTIVATED, Stage.DORMANT, Stage.CHURNED)
JOINED = "joined"  # transition matrix row: members present only in the later snapshot
LEFT = "left"  # transition matrix column: members present only in the earlier snapshot


class SegmentInput:
    """Inputs of the rule that are not snapshot features (computed alongside them)."""

    RFM_ORDERS = "rfm_orders"
    RFM_SPEND = "rfm_spend"
    LAST_GAP_DAYS = "last_gap_days"


SEGMENT_INPUTS = (C.MEMBER_ID, F.TENURE_DAYS, F.RECENCY_DAYS, F.ORDERS_TOTAL, SegmentInput.RFM_ORDERS,
                  SegmentInput.RFM_SPEND, SegmentInput.LAST_GAP_DAYS)
SEGMENT_OUTPUTS = (F.RFM_R, F.RFM_F, F.RFM_M, F.RFM_SEGMENT, F.LIFECYCLE_STAGE)


class Dist:
    """Columns of :func:`segment_distribution`."""

    KIND = "kind"  # 'segment' or 'stage'
    NAME = "name"
    MEMBERS = "members"
    SHARE = "share"


def _lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _score_sql(column: str, bins: int, ranked: str, descending: bool) -> str:
    order = "DESC" if descending else "ASC"
    rank = f"RANK() OVER (PARTITION BY {ranked} ORDER BY {column} {order})"
    n = f"COUNT(*) OVER (PARTITION BY {ranked})"
    return (f"CASE WHEN {ranked} THEN LEAST({bins}, 1 + CAST(FLOOR(({rank} - 1) * {bins} "
            f"/ CAST({n} AS DOUBLE)) AS INTEGER)) ELSE 0 END")


def segment_sql(settings: Settings, relation: str) -> str:
    """A SELECT over ``relation`` (which has :data:`SEGMENT_INPUTS`) returning all its columns plus
    :data:`SEGMENT_OUTPUTS` (and a helper flag column). Portable SQL (window functions, CASE); sqlglot
    transpiles it to Spark."""
    rfm, life = settings.rfm, settings.lifecycle
    ranked = "_rfm_ranked"
    scored = (
        f"SELECT _ranked.*, "
        f"{_score_sql(F.RECENCY_DAYS, rfm.bins, ranked, True)} AS {F.RFM_R}, "
        f"{_score_sql(SegmentInput.RFM_ORDERS, rfm.bins, ranked, False)} AS {F.RFM_F}, "
        f"{_score_sql(SegmentInput.RFM_SPEND, rfm.bins, ranked, False)} AS {F.RFM_M} "
        f"FROM (SELECT {relation}.*, ({SegmentInput.RFM_ORDERS} > 0) AS {ranked} FROM {relation}) AS _ranked"
    )
    r, f, m = (f"GREATEST({F.RFM_R}, 1)", f"GREATEST({F.RFM_F}, 1)", f"GREATEST({F.RFM_M}, 1)")
    seg = [f"WHEN {F.TENURE_DAYS} <= {life.new_member_days} THEN {_lit(rfm.new_segment)}",
           f"WHEN {F.ORDERS_TOTAL} = 0 THEN {_lit(rfm.no_purchase_segment)}"]
    for s in rfm.segments:
        seg.append(f"WHEN {r} BETWEEN {s.r[0]} AND {s.r[1]} AND {f} BETWEEN {s.f[0]} AND {s.f[1]} "
                   f"AND {m} BETWEEN {s.m[0]} AND {s.m[1]} THEN {_lit(s.name)}")
    inactive = f"COALESCE({F.RECENCY_DAYS}, {F.TENURE_DAYS})"
    stage = [
        f"WHEN {F.TENURE_DAYS} <= {life.new_member_days} THEN {_lit(Stage.NEW)}",
        f"WHEN {inactive} >= {life.churned_days} THEN {_lit(Stage.CHURNED)}",
        f"WHEN {inactive} >= {life.dormant_days} THEN {_lit(Stage.DORMANT)}",
        f"WHEN {F.RECENCY_DAYS} <= {life.reactivated_days} AND {SegmentInput.LAST_GAP_DAYS} >= "
        f"{life.dormant_days} THEN {_lit(Stage.REACTIVATED)}",
        f"ELSE {_lit(Stage.ACTIVE)}",
    ]
    return (f"SELECT _scored.*, CASE {' '.join(seg)} ELSE NULL END AS {F.RFM_SEGMENT}, "
            f"CASE {' '.join(stage)} END AS {F.LIFECYCLE_STAGE} FROM ({scored}) AS _scored")


def assign_segments(frame: pd.DataFrame, settings: Settings) -> pd.DataFrame:
    """``frame`` (one row per member, with :data:`SEGMENT_INPUTS`) with the RFM scores, segment and
    lifecycle stage added (replacing any existing ones), rows in the input order.

    RFM scores are quantiles within ``frame``: pass all members of one as-of date together.
    """
    missing = [c for c in SEGMENT_INPUTS if c not in frame.columns]
    if missing:
        raise KeyError(f"assign_segments: input frame lacks column(s) {', '.join(missing)}; "
                       f"it needs {', '.join(SEGMENT_INPUTS)}")
    inputs = frame[list(SEGMENT_INPUTS)].reset_index(drop=True)
    inputs["_row"] = range(len(inputs))
    # NaN becomes SQL NULL ("never bought"), never a number compared against thresholds.
    _members = pa.Table.from_pandas(inputs, preserve_index=False)
    with connect_duckdb() as con:
        out = con.sql(f"SELECT _row, {', '.join(SEGMENT_OUTPUTS)} FROM ({segment_sql(settings, '_members')}) "
                      "AS _s ORDER BY _row").df()
    result = frame.drop(columns=[c for c in SEGMENT_OUTPUTS if c in frame.columns]).copy()
    for col in SEGMENT_OUTPUTS:
        result[col] = out[col].to_numpy()
    for col in (F.RFM_R, F.RFM_F, F.RFM_M):
        result[col] = result[col].astype("int64")
    return result


def segment_distribution(snapshot: pd.DataFrame, settings: Settings) -> pd.DataFrame:
    """Members and share per RFM segment and per lifecycle stage of a member snapshot.

    Columns ``kind`` ('segment' or 'stage'), ``name``, ``members``, ``share`` (of the snapshot's members,
    per as-of date when the frame holds several). Every segment of the settings and every stage is listed,
    with 0 when empty, in the settings' order; members without a segment appear under a null name.
    """
    for col in (F.RFM_SEGMENT, F.LIFECYCLE_STAGE):
        if col not in snapshot.columns:
            raise KeyError(f"segment_distribution: snapshot lacks column {col!r}")
    groups = snapshot.groupby(C.AS_OF, sort=True) if C.AS_OF in snapshot.columns else [(None, snapshot)]
    parts = []
    for as_of, snap in groups:
        for kind, col, names in (("segment", F.RFM_SEGMENT, settings.rfm.segment_names),
                                 ("stage", F.LIFECYCLE_STAGE, STAGES)):
            counts = snap[col].value_counts(dropna=False)
            index = list(names) + [k for k in counts.index if k not in names]
            counts = counts.reindex(index, fill_value=0)
            part = pd.DataFrame({Dist.KIND: kind, Dist.NAME: index, Dist.MEMBERS: counts.to_numpy("int64")})
            part[Dist.SHARE] = part[Dist.MEMBERS] / len(snap) if len(snap) else float("nan")
            if as_of is not None:
                part.insert(0, C.AS_OF, as_of)
            parts.append(part)
    return pd.concat(parts, ignore_index=True)


def transition_matrix(snapshot_a: pd.DataFrame, snapshot_b: pd.DataFrame) -> pd.DataFrame:
    """Member counts by lifecycle stage at A (rows) and at B (columns), matched on member_id.

    Rows are the stages plus ``joined`` (members only in B); columns are the stages plus ``left``
    (members only in A, which a cumulative member table should never produce). Every member of either
    snapshot is counted exactly once.
    """
    for name, snap in (("snapshot_a", snapshot_a), ("snapshot_b", snapshot_b)):
        for col in (C.MEMBER_ID, F.LIFECYCLE_STAGE):
            if col not in snap.columns:
                raise KeyError(f"transition_matrix: {name} lacks column {col!r}")
        if snap[C.MEMBER_ID].duplicated().any():
            raise ValueError(f"transition_matrix: {name} has duplicate {C.MEMBER_ID} values; "
                             "pass one as-of date")
    a = snapshot_a[[C.MEMBER_ID, F.LIFECYCLE_STAGE]]
    b = snapshot_b[[C.MEMBER_ID, F.LIFECYCLE_STAGE]]
    both = a.merge(b, on=C.MEMBER_ID, how="outer", suffixes=("_a", "_b"))
    row = both[F.LIFECYCLE_STAGE + "_a"].fillna(JOINED)
    col = both[F.LIFECYCLE_STAGE + "_b"].fillna(LEFT)
    rows = [*list(STAGES), JOINED, *sorted(set(row) - {*STAGES, JOINED})]
    cols = [*list(STAGES), LEFT, *sorted(set(col) - {*STAGES, LEFT})]
    matrix = pd.crosstab(row, col).reindex(index=rows, columns=cols, fill_value=0).astype("int64")
    matrix.index.name, matrix.columns.name = F.LIFECYCLE_STAGE + "_a", F.LIFECYCLE_STAGE + "_b"
    return matrix

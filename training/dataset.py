"""Training sets: labels at cutoff dates joined to point-in-time features through Feast.

Labels come from the lake (:func:`training.labels.build_labels`); features come only from the feature store
(:func:`features.store.training_frame`, Feast ``get_historical_features``) with the cutoff's UTC midnight as
the entity timestamp, so a row's features describe ``ts < cutoff`` and its labels ``ts >= cutoff``. Nothing
here computes a feature.

Example::

    from training.dataset import build_training_set, default_cutoffs
    cutoffs = default_cutoffs(settings, n=4, every_days=28)    # snapshot dates with observed labels
    frame = build_training_set(settings, cutoffs, "churn_v1")  # member_id, event_timestamp, labels, features
    frame.attrs["features"]                                     # the FeatureService's features, in order
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from datetime import date, timedelta
from typing import Any

import pandas as pd

from features.contract import C
from features.lake import MEMBER_VIEW, connect_duckdb, snapshot_dates, snapshot_dir, table_glob
from features.settings import Settings
from training.labels import L, build_labels

log = logging.getLogger(__name__)

CHURN_SERVICE = "churn_v1"
LABEL_COLUMNS = (L.CUTOFF, L.CHURN, L.LABEL_OBSERVABLE, L.ORDERS_NEXT_H, L.DAYS_TO_NEXT, L.NEXT_EVENT,
                 L.SPEND_NEXT, L.SPEND_OBSERVABLE)
"""Columns of a training set that are labels (never features)."""


class TrainingSetError(RuntimeError):
    """A training set that cannot be built as asked (no observable label, rows lost in the join, ...)."""


_session: dict[Any, pd.DataFrame] | None = None
"""Lake tables and labels already read in the open :func:`lake_session` (None: no session)."""


@contextlib.contextmanager
def lake_session() -> Iterator[None]:
    """Read each lake table and build each set of labels once while the block runs.

    A retrain of every model (``repurchase train all``) otherwise reads the transaction table and labels
    every member at the same cutoffs several times per model. Inside the block :func:`read_lake_table`
    and the labels of :func:`build_training_set` are kept and handed out again; the frames are shared,
    so callers treat them as read-only (nothing in training writes to them). The lake must not change
    while the block runs. Sessions nest (the outermost one owns the cache); leaving it frees everything.
    """
    global _session
    if _session is not None:
        yield
        return
    _session = {}
    try:
        yield
    finally:
        _session = None


def read_lake_table(settings: Settings, table: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Every row of lake ``table`` (``transactions``, ``members``, ...) as a pandas frame (only
    ``columns`` when given). Inside a :func:`lake_session` each table is read once."""
    glob = table_glob(settings, table)
    if _session is None:
        return _read_lake_table(glob, table, columns)
    whole = _session.get(("lake", glob, None))
    if whole is not None:
        return whole if columns is None else whole[list(columns)]
    return _kept(("lake", glob, None if columns is None else tuple(columns)),
                 lambda: _read_lake_table(glob, table, columns))


def _kept(key: Any, make: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """The frame the open :func:`lake_session` keeps under ``key``, made by ``make`` the first time."""
    assert _session is not None
    if key not in _session:
        _session[key] = make()
    return _session[key]


def _read_lake_table(glob: str, table: str, columns: Sequence[str] | None) -> pd.DataFrame:
    import duckdb

    select = ", ".join(f'"{c}"' for c in columns) if columns else "*"
    try:
        with connect_duckdb() as con:
            con.execute("SET TimeZone = 'UTC'")
            return con.execute(f"SELECT {select} FROM read_parquet('{glob}', hive_partitioning=false)").fetchdf()
    except duckdb.IOException:
        raise FileNotFoundError(f"no {table} in the lake ({glob}): run `repurchase ingest` first") from None


def _last_day(transactions: pd.DataFrame) -> date:
    if transactions.empty:
        raise TrainingSetError("the lake's transactions are empty: nothing can be labelled")
    return pd.Timestamp(transactions[C.TS].max()).tz_convert("UTC").date()


def last_data_day(settings: Settings) -> date:
    """The UTC date of the latest transaction in the lake (the last day labels can see)."""
    return _last_day(read_lake_table(settings, "transactions", columns=[C.TS]))


def default_cutoffs(settings: Settings, n: int = 4, every_days: int = 28) -> list[date]:
    """The latest ``n`` member snapshot dates, at least ``every_days`` apart, whose churn window
    ``[cutoff, cutoff + H)`` ends within the data; oldest first."""
    if n < 1 or every_days < 1:
        raise ValueError(f"default_cutoffs: n ({n}) and every_days ({every_days}) must be positive")
    snaps = snapshot_dates(settings, MEMBER_VIEW)
    if not snaps:
        raise TrainingSetError(f"no member feature snapshots under {snapshot_dir(settings, MEMBER_VIEW)}: "
                               "run `repurchase features build --history` first")
    end_excl = last_data_day(settings) + timedelta(days=1)
    horizon = timedelta(days=settings.lifecycle.horizon_days)
    picked: list[date] = []
    for d in reversed(snaps):
        if d + horizon > end_excl:
            continue
        if picked and (picked[-1] - d).days < every_days:
            continue
        picked.append(d)
        if len(picked) == n:
            break
    if not picked:
        raise TrainingSetError(f"no snapshot date leaves a full {settings.lifecycle.horizon_days}-day label "
                               f"window before the end of the data ({end_excl - timedelta(days=1)})")
    if len(picked) < n:
        log.warning("only %d of %d cutoffs available %d days apart", len(picked), n, every_days)
    return sorted(picked)


def service_features(settings: Settings, service: str) -> list[str]:
    """The feature names of FeatureService ``service``, in the service's order."""
    from features.store import definitions

    defs = definitions(settings)
    if service not in defs.services:
        raise KeyError(f"unknown feature service {service!r}; the services are {', '.join(defs.services)}")
    return [f.name for p in defs.services[service].feature_view_projections for f in p.features]


def build_training_set(settings: Settings, cutoffs: Sequence[date], service: str = CHURN_SERVICE,
                       end: date | None = None, max_rows: int | None = None) -> pd.DataFrame:
    """Labels at every cutoff joined to the point-in-time features of ``service``.

    One row per member who joined before the cutoff (for ``churn_v1`` only cutoffs whose churn label is
    observable; an unobservable cutoff is an error rather than a silent drop). Columns: ``member_id``,
    ``event_timestamp`` (the cutoff's UTC midnight), the label columns (``training.labels.L``), then the
    service's features. ``attrs`` holds ``service``, ``features``, ``cutoffs`` and ``fingerprint``.
    """
    from features.store import training_frame

    if len(cutoffs) == 0:
        raise ValueError("build_training_set: give at least one cutoff date")
    transactions = read_lake_table(settings, "transactions")
    members = read_lake_table(settings, "members")
    labels = _bounded(_labels(settings, transactions, members, cutoffs, end), max_rows)
    if service == CHURN_SERVICE:
        hidden = labels.loc[~labels[L.LABEL_OBSERVABLE], L.CUTOFF].drop_duplicates()
        if len(hidden):
            raise TrainingSetError(
                f"churn labels are not observable at cutoff(s) {', '.join(str(t.date()) for t in hidden)}: "
                f"their {settings.lifecycle.horizon_days}-day window ends after the data "
                f"({labels.attrs['end']}); use training.dataset.default_cutoffs")
        labels = labels[labels[L.LABEL_OBSERVABLE]]
    if labels.empty:
        raise TrainingSetError(f"no member joined before any of the cutoffs {[str(c) for c in cutoffs]}")
    entity = labels.reset_index(drop=True)
    entity.attrs = {}  # Feast's DuckDB store tries to serialise attrs (a date in them only makes it warn)
    entity.insert(1, C.EVENT_TIMESTAMP, entity[L.CUTOFF])
    frame = training_frame(settings, entity, service)
    if len(frame) != len(entity):  # training_frame checks this too; a training set must never lose rows
        raise TrainingSetError(f"training set for {service} has {len(frame)} rows for {len(entity)} "
                               "entity rows")
    feats = service_features(settings, service)
    missing = [f for f in feats if f not in frame.columns]
    if missing:
        raise TrainingSetError(f"Feast returned no column(s) {', '.join(missing)} for {service}")
    frame = frame[[C.MEMBER_ID, C.EVENT_TIMESTAMP, *[c for c in LABEL_COLUMNS if c in frame.columns], *feats]]
    frame.attrs.update(service=service, features=feats,
                       cutoffs=[str(pd.Timestamp(c).date()) for c in cutoffs],
                       fingerprint=data_fingerprint(frame), end=str(labels.attrs["end"]))
    log.info("training set for %s: %d rows over %d cutoff(s), %d features", service, len(frame),
             frame[C.EVENT_TIMESTAMP].nunique(), len(feats))
    return frame


def build_category_training_set(settings: Settings, cutoffs: Sequence[date], end: date | None = None,
                                max_rows: int | None = None) -> pd.DataFrame | None:
    """Per (member, replenishable category, cutoff) the days to the next purchase in that category
    (censored at ``end``) joined to the point-in-time member and member x category features of
    ``next_purchase_category_v1``. None when the items table flags no replenishable category or nobody
    bought in one before the cutoffs. ``attrs`` as :func:`build_training_set`'s, with the ``category``
    column among the features.
    """
    from features.definitions import NEXT_PURCHASE_CATEGORY_SERVICE
    from features.store import training_frame
    from training.labels import build_category_labels, replenishable_categories

    if len(cutoffs) == 0:
        raise ValueError("build_category_training_set: give at least one cutoff date")
    try:
        items = read_lake_table(settings, "items")
    except FileNotFoundError:
        return None
    categories = replenishable_categories(items)
    if not categories:
        return None
    transactions = read_lake_table(settings, "transactions")
    members = read_lake_table(settings, "members")
    labels = _bounded(build_category_labels(transactions, members, cutoffs, categories, end=end), max_rows)
    if labels.empty:
        return None
    entity = labels.reset_index(drop=True)
    entity.attrs = {}
    entity.insert(2, C.EVENT_TIMESTAMP, entity[L.CUTOFF])
    service = NEXT_PURCHASE_CATEGORY_SERVICE
    frame = training_frame(settings, entity, service)
    if len(frame) != len(entity):
        raise TrainingSetError(f"training set for {service} has {len(frame)} rows for {len(entity)} entity rows")
    feats = [C.CATEGORY, *service_features(settings, service)]
    label_cols = [L.CUTOFF, L.CAT_DAYS_TO_NEXT, L.CAT_NEXT_EVENT]
    frame = frame[[C.MEMBER_ID, C.EVENT_TIMESTAMP, *label_cols, *feats]]
    frame.attrs.update(service=service, features=feats,
                       cutoffs=[str(pd.Timestamp(c).date()) for c in cutoffs],
                       fingerprint=data_fingerprint(frame), end=str(labels.attrs["end"]))
    log.info("category training set: %d rows over %d cutoff(s), %d categories", len(frame),
             frame[C.EVENT_TIMESTAMP].nunique(), frame[C.CATEGORY].nunique())
    return frame


def _labels(settings: Settings, transactions: pd.DataFrame, members: pd.DataFrame, cutoffs: Sequence[date],
            end: date | None) -> pd.DataFrame:
    """:func:`training.labels.build_labels`, once per (cutoffs, end, windows) inside a :func:`lake_session`."""
    if _session is None:
        return build_labels(transactions, members, cutoffs, settings, end=end)
    key = ("labels", tuple(pd.Timestamp(c).value for c in cutoffs), end, settings.lifecycle.horizon_days,
           settings.training.value_horizon_days, id(transactions), id(members))
    return _kept(key, lambda: build_labels(transactions, members, cutoffs, settings, end=end))


def _bounded(labels: pd.DataFrame, max_rows: int | None) -> pd.DataFrame:
    """At most ``max_rows`` entity rows, sampled by member before the Feast join (which costs memory and
    time per row); the same members as the models' own sampling (``training.models.sample_by_member``)."""
    from training.models import sample_by_member

    if max_rows is None or len(labels) <= max_rows:
        return labels
    out = sample_by_member(labels, max_rows)
    out.attrs = dict(labels.attrs)
    log.info("sampled %d of %d entity rows by member before the feature join", len(out), len(labels))
    return out


def data_fingerprint(frame: pd.DataFrame) -> str:
    """A hash of a frame's columns and values (row order matters): the data's identity in MLflow."""
    h = hashlib.sha256()
    h.update("\x1f".join(map(str, frame.columns)).encode())
    h.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]

"""Every member's answers as of one date, computed in bulk by the champion models, and the files they live in.

``repurchase score`` computes them (:func:`score_members`) and writes them with :func:`write_scores`; the API
reads them back with :func:`latest_scores` and answers a member profile from them when they were made by the
models it serves, from the snapshot the online store holds (else it computes the answer live). One
partition per date, replaced whole in one rename, so a reader sees the old set or the new one, never a mix::

    <outputs>/scores/as_of=2025-12-31/
        members.parquet          one row per member: SC columns (churn, next purchase, value, segment, stage)
        recommendations.parquet  top-n per member: RC columns, ranks 1..n
        online.parquet           the same answers flat, as the Feast view member_scores holds them
                                 (features.definitions.SCORES_SCHEMA; its offline source)
        manifest.json            as_of, alias, model versions, feature service, counts, timings

Scores depend only on the features at ``as_of`` and the model versions: two runs with the same inputs write
the same rows (the manifest's timings and ``created_at`` aside).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from features.contract import C, F
from features.definitions import SCORES_ONLINE_FILE, SCORES_SCHEMA
from features.lake import atomic_path
from features.settings import Settings
from training.models import ChurnModel, ValueModel
from training.next_purchase import NP, NextPurchaseModel
from training.recommend import RC, Recommender

if TYPE_CHECKING:
    import pyarrow as pa

SCORES_DIR = "scores"
MEMBERS_FILE = "members.parquet"
RECS_FILE = "recommendations.parquet"
MANIFEST_FILE = "manifest.json"
FORMAT = 1


def np_column(name: str) -> str:
    """The ``members.parquet`` column of an ``NP`` summary column."""
    return f"np_{name}"


class SC:
    """Columns of ``members.parquet``."""

    MEMBER_ID = C.MEMBER_ID
    CHURN_P = "churn_probability"
    CHURN_BAND = "churn_band"
    REASONS = "churn_reasons"  # list of plain-word reasons, most important first
    NP_COLUMNS = tuple(np_column(c) for c in (NP.EXPECTED_DAYS, NP.LOWER_DAYS, NP.UPPER_DAYS, NP.P_7D, NP.P_30D,
                                           NP.REMIND_DAYS, NP.BEYOND_HORIZON))
    VALUE = "expected_spend"
    RFM_SEGMENT = F.RFM_SEGMENT
    LIFECYCLE_STAGE = F.LIFECYCLE_STAGE


def scores_root(settings: Settings) -> Path:
    return settings.dirs.outputs / SCORES_DIR


def partition(settings: Settings, as_of: date) -> Path:
    return scores_root(settings) / f"as_of={as_of.isoformat()}"


def score_members(settings: Settings, churn: ChurnModel, next_purchase: NextPurchaseModel, value: ValueModel,
                  recommender: Recommender, features: pd.DataFrame, n: int,
                  chunk: int = 50_000) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float]]:
    """(members, recommendations, seconds per step) for every row of ``features`` (one row per member, the
    serving FeatureService's columns). Members are sorted by id, so the output does not depend on the
    order the features came in. Chunks of ``chunk`` members are scored on ``serving.score_threads`` threads
    (LightGBM and implicit release the GIL): the same rows whatever the count; the step seconds are summed
    over the threads (CPU-like), the caller times the whole."""
    from concurrent.futures import ThreadPoolExecutor

    if features[C.MEMBER_ID].duplicated().any():
        dup = features.loc[features[C.MEMBER_ID].duplicated(), C.MEMBER_ID].iloc[0]
        raise ValueError(f"features hold member {dup!r} more than once; scores are one row per member")
    frame = features.sort_values(C.MEMBER_ID, kind="mergesort").reset_index(drop=True)
    ids = frame[C.MEMBER_ID].astype(str).to_numpy(dtype=object)
    top = settings.serving.reasons

    def one(lo: int) -> tuple[pd.DataFrame, pd.DataFrame | None, dict[str, float]]:
        part, seconds = frame.iloc[lo: lo + chunk], {}
        t = time.perf_counter()
        p = churn.predict_proba(part)
        out = {SC.MEMBER_ID: ids[lo: lo + chunk], SC.CHURN_P: p, SC.CHURN_BAND: churn.band(p).astype(object)}
        seconds["churn"] = time.perf_counter() - t
        t = time.perf_counter()
        out[SC.REASONS] = (churn.reasons(part, top=top, bands=settings.serving.reasons_bands, proba=p,
                                         skip_stages=settings.serving.reasons_skip_stages) if top
                           else [[] for _ in range(len(part))])
        seconds["reasons"] = time.perf_counter() - t
        t = time.perf_counter()
        for c, v in next_purchase.summary(part).items():
            out[np_column(c)] = v
        seconds["next_purchase"] = time.perf_counter() - t
        t = time.perf_counter()
        out[SC.VALUE] = value.predict(part)
        seconds["value"] = time.perf_counter() - t
        out[SC.RFM_SEGMENT] = part[F.RFM_SEGMENT].astype("string").to_numpy(dtype=object, na_value=None)
        out[SC.LIFECYCLE_STAGE] = part[F.LIFECYCLE_STAGE].astype("string").to_numpy(dtype=object, na_value=None)
        t = time.perf_counter()
        recs = recommender.recommend(list(out[SC.MEMBER_ID]), n=n) if n > 0 else None
        seconds["recommend"] = time.perf_counter() - t
        return pd.DataFrame(out), recs, seconds

    threads = settings.serving.score_threads or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="score") as pool:
        done = list(pool.map(one, range(0, len(frame), chunk)))  # in chunk order
    seconds: dict[str, float] = {}
    for _, _, sec in done:
        for k, v in sec.items():
            seconds[k] = seconds.get(k, 0.0) + v
    parts = [m for m, _, _ in done]
    recs = [r for _, r, _ in done if r is not None]
    members = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=_member_columns())
    rec_frame = (pd.concat(recs, ignore_index=True) if recs else pd.DataFrame({c: [] for c in RC.COLUMNS}))
    rec_frame[RC.BECAUSE] = rec_frame[RC.BECAUSE].astype("string")
    return members, rec_frame, {k: round(v, 3) for k, v in seconds.items()}


def _member_columns() -> list[str]:
    return [SC.MEMBER_ID, SC.CHURN_P, SC.CHURN_BAND, SC.REASONS, *SC.NP_COLUMNS, SC.VALUE, SC.RFM_SEGMENT,
            SC.LIFECYCLE_STAGE]


def online_table(as_of: date, members: pd.DataFrame, recommendations: pd.DataFrame, versions: dict[str, str],
                 top: int) -> pa.Table:
    """The Feast ``member_scores`` rows of a partition (``features.definitions.SCORES_SCHEMA``): one per
    member, reasons joined by "; ", the ``top`` recommended item ids joined by ",", the model versions."""
    import pyarrow as pa

    ids = members[SC.MEMBER_ID].astype(str).to_numpy(dtype=object)
    r = recommendations[recommendations[RC.RANK] <= top]
    # integer member positions and one lexsort: sorting 20M string keys took minutes at 1M members
    at = pd.Index(ids).get_indexer(r[RC.MEMBER_ID].astype(str))
    if (at < 0).any():
        raise ValueError("recommendations hold members the scores lack")
    order = np.lexsort((r[RC.RANK].to_numpy(), at))
    item = r[RC.ITEM_ID].astype(str).to_numpy(dtype=object)[order]
    bounds = np.searchsorted(at[order], np.arange(len(ids) + 1))
    joined = [",".join(item[bounds[k]:bounds[k + 1]]) for k in range(len(ids))]
    cols: dict[str, Any] = {C.MEMBER_ID: pa.array(ids, pa.string()),
                            C.AS_OF: pa.array(np.full(len(ids), np.datetime64(as_of, "us")), pa.timestamp("us",
                                                                                                        tz="UTC"))}
    for name, dtype in SCORES_SCHEMA.items():
        if name == "churn_reasons":
            cols[name] = pa.array(["; ".join(x) for x in members[SC.REASONS]], pa.string())
        elif name == "recommended_items":
            cols[name] = pa.array(joined, pa.string())
        elif name == "scored_by":
            text = ",".join(f"{k}={v}" for k, v in sorted(versions.items()))
            cols[name] = pa.array([text] * len(ids), pa.string())
        else:
            cols[name] = pa.array(members[name].to_numpy(dtype=object if dtype == "string" else None),
                                  {"float": pa.float64(), "bool": pa.bool_(), "string": pa.string()}[dtype],
                                  from_pandas=True)
    return pa.table(cols)


def write_scores(settings: Settings, as_of: date, members: pd.DataFrame, recommendations: pd.DataFrame,
                 manifest: dict[str, Any]) -> Path:
    """Write the partition of ``as_of`` in one rename (replacing an earlier one whole); return its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    target = partition(settings, as_of)
    body = {"format": FORMAT, "as_of": as_of.isoformat(), **manifest, "members": len(members),
            "recommendation_rows": len(recommendations)}
    with atomic_path(target) as tmp:
        tmp.mkdir(parents=True)
        # no pandas metadata (it records the index and the writer's versions): the same rows, the same bytes
        pq.write_table(pa.Table.from_pandas(members[_member_columns()], preserve_index=False)
                       .replace_schema_metadata(None), tmp / MEMBERS_FILE)
        pq.write_table(pa.Table.from_pandas(recommendations[list(RC.COLUMNS)], preserve_index=False)
                       .replace_schema_metadata(None), tmp / RECS_FILE)
        pq.write_table(online_table(as_of, members, recommendations, dict(manifest.get("versions", {})),
                                    settings.recommend.n), tmp / SCORES_ONLINE_FILE)
        (tmp / MANIFEST_FILE).write_text(json.dumps(body, indent=2, sort_keys=True, default=str))
    return target


def score_dates(settings: Settings) -> list[date]:
    """Dates with a complete scores partition, oldest first."""
    root = scores_root(settings)
    out = []
    for p in root.glob("as_of=*"):
        try:
            d = date.fromisoformat(p.name.removeprefix("as_of="))
        except ValueError:
            continue
        if (p / MANIFEST_FILE).exists():
            out.append(d)
    return sorted(out)


def read_manifest(settings: Settings, as_of: date) -> dict[str, Any]:
    return json.loads((partition(settings, as_of) / MANIFEST_FILE).read_text())


@dataclass(frozen=True)
class ScoreTable:
    """One scores partition in memory, for answering a member by id without touching a model: numbers as
    numpy columns, texts as pandas categories' codes, recommendations as one run of rows per member."""

    as_of: date
    manifest: dict[str, Any]
    row: dict[str, int]
    members: dict[str, np.ndarray]
    reasons: list[list[str]]
    rec_start: np.ndarray  # rows of member k's recommendations: rec_start[k]:rec_start[k + 1]
    recs: dict[str, np.ndarray]
    rec_n: int

    @property
    def versions(self) -> dict[str, str]:
        return dict(self.manifest["versions"])

    @classmethod
    def load(cls, settings: Settings, as_of: date) -> ScoreTable:
        path = partition(settings, as_of)
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        m = pd.read_parquet(path / MEMBERS_FILE)
        r = pd.read_parquet(path / RECS_FILE)
        ids = m[SC.MEMBER_ID].astype(str).to_numpy()
        row = {k: i for i, k in enumerate(ids)}
        cols = {c: m[c].to_numpy(dtype=np.float64, na_value=np.nan) for c in (SC.CHURN_P, SC.VALUE, *SC.NP_COLUMNS)}
        for c in (SC.CHURN_BAND, SC.RFM_SEGMENT, SC.LIFECYCLE_STAGE):
            cols[c] = m[c].astype("string").to_numpy(dtype=object, na_value=None)
        reasons = [list(x) for x in m[SC.REASONS]]
        at = pd.Index(ids).get_indexer(r[RC.MEMBER_ID].astype(str))
        if (at < 0).any():
            raise ValueError(f"{path / RECS_FILE} has recommendations for members {path / MEMBERS_FILE} lacks")
        order = np.lexsort((r[RC.RANK].to_numpy(), at))
        r = r.iloc[order]
        start = np.searchsorted(at[order], np.arange(len(ids) + 1))
        recs = {c: r[c].to_numpy() for c in (RC.RANK, RC.SCORE, RC.COLD_START)}
        for c in (RC.ITEM_ID, RC.SOURCE, RC.BECAUSE, RC.REASON):
            cat = r[c].astype("category")  # a few distinct texts shared by many rows: one object each
            texts = np.asarray([*cat.cat.categories.astype(object), None], dtype=object)
            codes = cat.cat.codes.to_numpy()
            recs[c] = texts[np.where(codes < 0, len(texts) - 1, codes)]
        n = int(np.diff(start).max()) if len(ids) else 0
        return cls(as_of=as_of, manifest=manifest, row=row, members=cols, reasons=reasons, rec_start=start,
                   recs=recs, rec_n=int(manifest.get("recommend_n", n)))


def latest_scores(settings: Settings, versions: dict[str, str], as_of: date | None) -> ScoreTable | None:
    """The scores partition of ``as_of`` (the snapshot the online store holds) if the models of
    ``versions`` wrote it; else None (the caller answers live)."""
    if as_of is None or as_of not in score_dates(settings):
        return None
    manifest = read_manifest(settings, as_of)
    if manifest.get("format") != FORMAT or manifest.get("versions") != versions:
        return None
    return ScoreTable.load(settings, as_of)


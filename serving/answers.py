"""What the API answers, as plain functions of the online features and one :class:`Champions` set: no HTTP
here, so the answers are tested (and benchmarked) without a server.

The features come from ``features.store.online_columns`` (the serving FeatureService, the same member
features the models were trained on through their own services); nothing here computes a feature. A member
the online store does not hold gets the documented cold-start answer: ``cold_start`` true, ``known`` false,
the scores null (nothing is known about them, so no model is asked to guess), and the recommender's popular
items for members with no history.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from features.contract import C, F
from features.lake import MEMBER_VIEW, snapshot_dates, snapshot_path
from features.settings import Settings
from serving.champions import Champions
from serving.schemas import (
    Churn,
    GoesWith,
    MemberProfile,
    NextPurchase,
    Recommendation,
    Recommendations,
    SegmentMember,
    SegmentMembers,
    SimilarItem,
    SimilarItems,
    Value,
)
from training.basket import R
from training.next_purchase import NP
from training.recommend import RC
from training.scores import SC, ScoreTable, np_column

COLD_START_NOTE = ("member not in the online store (new since the last feature run, or an unknown id): "
                   "no scores; the recommendations are the popular items")
_SEGMENT_COLUMNS = (C.MEMBER_ID, F.RFM_SEGMENT, F.LIFECYCLE_STAGE, F.RECENCY_DAYS, F.ORDERS_TOTAL)


def _num(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _text(v: Any) -> str | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA else str(v)


def _day(base: date, days: float | None) -> date | None:
    # time t days after the snapshot (midnight of as_of) falls on as_of + floor(t)
    return None if days is None else base + timedelta(days=math.floor(days))


def _recommendations(frame: pd.DataFrame) -> dict[str, list[Recommendation]]:
    out: dict[str, list[Recommendation]] = {}
    cols = [frame[c].to_numpy() for c in (RC.MEMBER_ID, RC.RANK, RC.ITEM_ID, RC.SCORE, RC.SOURCE, RC.BECAUSE,
                                          RC.REASON)]
    for m, rank, item, score, source, because, reason in zip(*cols, strict=True):
        out.setdefault(str(m), []).append(Recommendation(
            rank=int(rank), item_id=str(item), score=float(score), source=str(source),
            because_item=_text(because), reason=str(reason)))
    return out


def _next_purchase(as_of: date, p: dict[str, float | None], beyond_horizon: bool) -> NextPurchase:
    """The profile's next purchase from the ``NP`` summary values of one member (days after ``as_of``)."""
    return NextPurchase(
        expected_date=_day(as_of, p[NP.EXPECTED_DAYS]), expected_days=p[NP.EXPECTED_DAYS],
        interval_from=_day(as_of, p[NP.LOWER_DAYS]), interval_to=_day(as_of, p[NP.UPPER_DAYS]),
        p_7d=p[NP.P_7D], p_30d=p[NP.P_30D], remind_at=_day(as_of, p[NP.REMIND_DAYS]), beyond_horizon=beyond_horizon)


def recommend(champions: Champions, member_ids: list[str], n: int, exclude_items: list[str] = (),
              exclude_categories: list[str] = (), categories: list[str] | None = None) -> list[Recommendations]:
    """Top ``n`` of each member (unknown ones get the popular items, ``cold_start``), with the filters."""
    rec = champions.recommender
    frame = rec.recommend(member_ids, n=n, exclude_items=exclude_items, exclude_categories=exclude_categories,
                          categories=categories)
    by_member = _recommendations(frame)
    cold = dict(zip(frame[RC.MEMBER_ID].astype(str), frame[RC.COLD_START], strict=True))
    known = set(rec.members)
    version = champions.versions["recommend"]
    return [Recommendations(member_id=m, cold_start=bool(cold.get(m, m not in known)),
                            recommendations=by_member.get(m, []), model_version=version) for m in member_ids]


def profiles(settings: Settings, champions: Champions, features: Mapping[str, np.ndarray],
             n: int) -> list[MemberProfile]:
    """The member profile of each row of ``features`` (an ``online_columns`` answer), in order."""
    ids = [str(m) for m in features[C.MEMBER_ID]]
    ts = features[C.FEATURE_TS]
    known = ~np.isnat(ts)
    rows = np.flatnonzero(known)
    warm = features if known.all() else {c: v[rows] for c, v in features.items()}
    churn_p = band = reasons = npf = value = None
    if len(rows):
        churn_p = champions.churn.predict_proba(warm)
        band = champions.churn.band(churn_p)
        top = settings.serving.reasons
        reasons = (champions.churn.reasons(warm, top=top, bands=settings.serving.reasons_bands, proba=churn_p,
                                           skip_stages=settings.serving.reasons_skip_stages)
                   if top else [[] for _ in rows])
        npf = champions.next_purchase.summary(warm)
        value = champions.value.predict(warm)
    recs = _recommendations(champions.recommender.recommend(ids, n=n)) if n > 0 else {}
    versions = dict(champions.versions)
    horizon = settings.training.value_horizon_days
    out: list[MemberProfile] = []
    at = {int(r): k for k, r in enumerate(rows)}
    days = ts.astype("datetime64[D]")
    age, stale = features[C.FEATURE_AGE_DAYS], features[C.STALE]
    segment, stage = features[F.RFM_SEGMENT], features[F.LIFECYCLE_STAGE]
    for i, m in enumerate(ids):
        k = at.get(i)
        if k is None:
            out.append(MemberProfile(member_id=m, known=False, cold_start=True, note=COLD_START_NOTE, as_of=None,
                                     feature_age_days=None, stale=True, churn=None, next_purchase=None, value=None,
                                     rfm_segment=None, lifecycle_stage=None, recommendations=recs.get(m, []),
                                     models=versions))
            continue
        as_of = days[i].item()
        p = {c: _num(v[k]) for c, v in npf.items() if c != NP.BEYOND_HORIZON}
        out.append(MemberProfile(
            member_id=m, known=True, cold_start=False, as_of=as_of, feature_age_days=_num(age[i]),
            stale=bool(stale[i]),
            churn=Churn(probability=float(churn_p[k]), band=str(band[k]), reasons=reasons[k]),
            next_purchase=_next_purchase(as_of, p, bool(npf[NP.BEYOND_HORIZON][k])),
            value=Value(expected_spend=float(value[k]), horizon_days=horizon),
            rfm_segment=_text(segment[i]), lifecycle_stage=_text(stage[i]),
            recommendations=recs.get(m, []), models=versions))
    return out


def precomputed(settings: Settings, champions: Champions, table: ScoreTable, member_ids: list[str], n: int,
                now: float | None = None) -> list[MemberProfile | None]:
    """The profile of each member from ``table`` (a partition the served versions wrote from the latest
    snapshot), None where the table does not hold the member or holds fewer than ``n`` recommendations
    (the caller answers those live). The same answer :func:`profiles` gives, without running a model."""
    if n > table.rec_n:
        return [None] * len(member_ids)
    now = time.time() if now is None else now
    as_of = table.as_of
    age = (now - _midnight(as_of)) / 86400.0
    stale = not age <= settings.features.ttl_days
    versions = dict(champions.versions)
    horizon = settings.training.value_horizon_days
    m, r = table.members, table.recs
    np_cols = {c: np_column(c) for c in (NP.EXPECTED_DAYS, NP.LOWER_DAYS, NP.UPPER_DAYS, NP.P_7D, NP.P_30D,
                                         NP.REMIND_DAYS)}
    out: list[MemberProfile | None] = []
    for member in member_ids:
        k = table.row.get(member)
        if k is None:
            out.append(None)
            continue
        p = {c: _num(m[col][k]) for c, col in np_cols.items()}
        lo = int(table.rec_start[k])
        hi = min(int(table.rec_start[k + 1]), lo + n)
        cols = [r[c][lo:hi].tolist() for c in (RC.RANK, RC.ITEM_ID, RC.SCORE, RC.SOURCE, RC.BECAUSE, RC.REASON)]
        recs = [Recommendation(rank=rank, item_id=str(item), score=score, source=source,
                               because_item=_text(because), reason=reason)
                for rank, item, score, source, because, reason in zip(*cols, strict=True)]
        out.append(MemberProfile(
            member_id=member, known=True, cold_start=False, as_of=as_of, feature_age_days=age, stale=stale,
            churn=Churn(probability=float(m[SC.CHURN_P][k]), band=str(m[SC.CHURN_BAND][k]),
                        reasons=table.reasons[k]),
            next_purchase=_next_purchase(as_of, p, bool(m[np_column(NP.BEYOND_HORIZON)][k])),
            value=Value(expected_spend=float(m[SC.VALUE][k]), horizon_days=horizon),
            rfm_segment=_text(m[SC.RFM_SEGMENT][k]), lifecycle_stage=_text(m[SC.LIFECYCLE_STAGE][k]),
            recommendations=recs, models=versions, source="precomputed"))
    return out


def _midnight(day: date) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


def basket(champions: Champions, items: list[str], n: int) -> tuple[list[str], list[GoesWith]]:
    """(basket items no rule knows, what goes with the basket)."""
    unknown = [x for x in items if not champions.rules.knows(x)]
    return unknown, [GoesWith(**g) for g in champions.rules.goes_with(items, n)]


def similar(champions: Champions, item_id: str, n: int) -> SimilarItems:
    """Items bought in the same baskets as ``item_id``; an item no basket holds gets an empty list."""
    sim = champions.similar
    version = champions.versions["recommend"]
    if sim.labels.get_indexer([item_id])[0] < 0:
        return SimilarItems(item_id=item_id, known=False, similar=[], model_version=version)
    frame = sim.similar(item_id, n=n)
    return SimilarItems(item_id=item_id, known=True, model_version=version,
                        similar=[SimilarItem(item_id=str(i), score=float(s))
                                 for i, s in zip(frame[R.ITEM], frame["score"], strict=True)])


@dataclass(frozen=True)
class SegmentIndex:
    """Members of each RFM segment and lifecycle stage of the latest member snapshot, by member id, for
    paging (the online store is keyed by member and cannot be asked who is in a segment)."""

    as_of: date
    frame: pd.DataFrame
    by_segment: dict[str, np.ndarray]
    by_stage: dict[str, np.ndarray]

    @classmethod
    def latest(cls, settings: Settings) -> SegmentIndex | None:
        dates = snapshot_dates(settings, MEMBER_VIEW)
        if not dates:
            return None
        as_of = dates[-1]
        frame = (pd.read_parquet(snapshot_path(settings, MEMBER_VIEW, as_of.isoformat()),
                                 columns=list(_SEGMENT_COLUMNS))
                 .sort_values(C.MEMBER_ID, kind="mergesort").reset_index(drop=True))

        def groups(col: str) -> dict[str, np.ndarray]:
            codes = frame[col].astype("string").fillna("")
            return {str(k): np.asarray(v) for k, v in frame.groupby(codes, sort=False).indices.items()}

        return cls(as_of=as_of, frame=frame, by_segment=groups(F.RFM_SEGMENT), by_stage=groups(F.LIFECYCLE_STAGE))

    def page(self, segment: str | None, stage: str | None, page: int, page_size: int) -> SegmentMembers:
        rows = self.by_segment.get(segment, np.empty(0, dtype=np.int64)) if segment is not None else \
            self.by_stage.get(stage, np.empty(0, dtype=np.int64))
        lo = (page - 1) * page_size
        part = self.frame.iloc[rows[lo: lo + page_size]]
        members = [SegmentMember(member_id=str(m), rfm_segment=_text(s), lifecycle_stage=_text(st),
                                 recency_days=_num(r), orders_total=_num(o))
                   for m, s, st, r, o in zip(*(part[c].to_numpy() for c in _SEGMENT_COLUMNS), strict=True)]
        return SegmentMembers(segment=segment, stage=stage, as_of=self.as_of, total=len(rows), page=page,
                              page_size=page_size, pages=max(1, math.ceil(len(rows) / page_size)), members=members)

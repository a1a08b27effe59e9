"""What the API answers, as plain functions of the online features and one :class:`Champions` set: no HTTP
here, so the answers are tested (and benchmarked) without a server.

The features come from ``features.store.online_features`` (the serving FeatureService, the same member
features the models were trained on through their own services); nothing here computes a feature. A member
the online store does not hold gets the documented cold-start answer: ``cold_start`` true, ``known`` false,
the scores null (nothing is known about them, so no model is asked to guess), and the recommender's popular
items for members with no history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, timedelta
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


def profiles(settings: Settings, champions: Champions, features: pd.DataFrame, n: int) -> list[MemberProfile]:
    """The member profile of each row of ``features`` (an ``online_features`` frame), in order."""
    ids = [str(m) for m in features[C.MEMBER_ID]]
    known = features[C.FEATURE_TS].notna().to_numpy()
    rows = np.flatnonzero(known)
    warm = features.iloc[rows]
    churn_p = band = reasons = npf = value = None
    if len(rows):
        churn_p = champions.churn.predict_proba(warm)
        band = champions.churn.band(churn_p)
        top = settings.serving.reasons
        reasons = champions.churn.reasons(warm, top=top) if top else [[] for _ in rows]
        npf = champions.next_purchase.predict(warm)
        value = champions.value.predict(warm)
    recs = _recommendations(champions.recommender.recommend(ids, n=n)) if n > 0 else {}
    versions = dict(champions.versions)
    horizon = settings.training.value_horizon_days
    out: list[MemberProfile] = []
    at = {int(r): k for k, r in enumerate(rows)}
    ts = features[C.FEATURE_TS]
    age = features[C.FEATURE_AGE_DAYS].to_numpy()
    stale = features[C.STALE].to_numpy()
    segment, stage = features[F.RFM_SEGMENT].to_numpy(), features[F.LIFECYCLE_STAGE].to_numpy()
    for i, m in enumerate(ids):
        k = at.get(i)
        if k is None:
            out.append(MemberProfile(member_id=m, known=False, cold_start=True, note=COLD_START_NOTE, as_of=None,
                                     feature_age_days=None, stale=True, churn=None, next_purchase=None, value=None,
                                     rfm_segment=None, lifecycle_stage=None, recommendations=recs.get(m, []),
                                     models=versions))
            continue
        as_of = ts.iloc[i].date()
        p = npf.iloc[k]
        out.append(MemberProfile(
            member_id=m, known=True, cold_start=False, as_of=as_of, feature_age_days=_num(age[i]),
            stale=bool(stale[i]),
            churn=Churn(probability=float(churn_p[k]), band=str(band[k]), reasons=reasons[k]),
            next_purchase=NextPurchase(
                expected_date=_day(as_of, _num(p[NP.EXPECTED_DAYS])), expected_days=_num(p[NP.EXPECTED_DAYS]),
                interval_from=_day(as_of, _num(p[NP.LOWER_DAYS])), interval_to=_day(as_of, _num(p[NP.UPPER_DAYS])),
                p_7d=_num(p[NP.P_7D]), p_30d=_num(p[NP.P_30D]), remind_at=_day(as_of, _num(p[NP.REMIND_DAYS])),
                beyond_horizon=bool(p[NP.BEYOND_HORIZON])),
            value=Value(expected_spend=float(value[k]), horizon_days=horizon),
            rfm_segment=_text(segment[i]), lifecycle_stage=_text(stage[i]),
            recommendations=recs.get(m, []), models=versions))
    return out


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

"""Feast objects of repurchase: entities, file sources, feature views and one feature service per model.

Everything is built from settings by :func:`build_definitions` (no Feast object exists at import time);
``features.store.apply`` registers them. Feature view schemas are generated from the contract's snapshot
schemas, so a feature added to ``features.contract`` appears in Feast without editing this file.

Sources are the snapshot parquet files of ``features.lake.snapshot_glob`` (one file per as-of date); the
Feast timestamp field is ``as_of`` (a row with ``as_of = D`` uses only data before D).

One more view holds no features but the answers: ``member_scores`` (:data:`SCORES_SCHEMA`), written by
``repurchase score`` for every member (churn probability, band and reasons, next purchase, value, segment,
stage, the top recommendations and the model versions), so campaign tools can read a member's answers from
the online store (service ``scores_v1``) or, point in time, from the offline store (its source is the
``online.parquet`` file of each scores partition).

TTL, and what it means where
----------------------------
- ``get_historical_features`` (training, batch scoring): a feature row is joined to an entity row at time
  T when ``T - ttl <= as_of <= T``; the latest such row wins. The views' ttl is therefore
  ``snapshot_every_days + ttl_days``: an entity row always finds the latest snapshot when snapshots are
  written on schedule (at most ``snapshot_every_days`` old), with ``ttl_days`` of slack for a late daily
  run. An entity row older than the first snapshot, or after a gap in the snapshots longer than that,
  gets nulls (the row is kept; ``features.store.training_frame`` asserts the row count).
- ``get_online_features`` (serving): Feast 0.67 does not apply ttl to online reads (feast#1802, #6821);
  a stale value comes back as present. ``features.store.online_features`` returns each row's feature
  timestamp and age and flags rows older than ``ttl_days`` as stale instead.

Example::

    defs = build_definitions(settings)
    defs.views["member_features"].name              # 'member_features'
    [s.name for s in defs.services.values()]       # ['churn_v1', 'next_purchase_v1', ...]
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource
from feast.types import Bool, Float64, Int64, String
from feast.value_type import ValueType

from features.contract import (
    ITEM_FEATURE_SCHEMA,
    MEMBER_CATEGORY_FEATURE_SCHEMA,
    C,
    DType,
    member_feature_schema,
)
from features.lake import ITEM_VIEW, MEMBER_CATEGORY_VIEW, MEMBER_VIEW, snapshot_glob
from features.settings import Settings

SCORES_VIEW = "member_scores"
SCORES_ONLINE_FILE = "online.parquet"  # in each <outputs>/scores/as_of=D/ partition
SCORES_SCHEMA: dict[str, DType] = {
    "churn_probability": "float",
    "churn_band": "string",
    "churn_reasons": "string",  # the reasons, most important first, joined by "; " (empty: none)
    "np_expected_days": "float",
    "np_lower_days": "float",
    "np_upper_days": "float",
    "np_p_7d": "float",
    "np_p_30d": "float",
    "np_remind_days": "float",
    "np_beyond_horizon": "bool",
    "expected_spend": "float",
    "rfm_segment": "string",
    "lifecycle_stage": "string",
    "recommended_items": "string",  # item ids, best first, joined by "," (the top serving.recommend n)
    "scored_by": "string",  # the model versions, e.g. "churn=3,next_purchase=2,recommend=1,value=4"
}
"""Columns of the ``member_scores`` view after ``member_id`` and ``as_of`` (training.scores writes them)."""

MEMBER_ENTITY = "member"
ITEM_ENTITY = "item"
CATEGORY_ENTITY = "category"

CHURN_SERVICE = "churn_v1"
NEXT_PURCHASE_SERVICE = "next_purchase_v1"
NEXT_PURCHASE_CATEGORY_SERVICE = "next_purchase_category_v1"
VALUE_SERVICE = "value_v1"
RECOMMENDER_SERVICE = "recommender_v1"
SERVING_SERVICE = "serving_v1"
SCORES_SERVICE = "scores_v1"
SERVICES = (CHURN_SERVICE, NEXT_PURCHASE_SERVICE, NEXT_PURCHASE_CATEGORY_SERVICE, VALUE_SERVICE, RECOMMENDER_SERVICE,
            SERVING_SERVICE, SCORES_SERVICE)

_FEAST_TYPES = {"int": Int64, "float": Float64, "string": String, "bool": Bool}

# Join keys of each view, in the order of the snapshot files.
VIEW_KEYS: dict[str, tuple[str, ...]] = {
    MEMBER_VIEW: (C.MEMBER_ID,),
    MEMBER_CATEGORY_VIEW: (C.MEMBER_ID, C.CATEGORY),
    ITEM_VIEW: (C.ITEM_ID,),
    SCORES_VIEW: (C.MEMBER_ID,),
}


@dataclass(frozen=True)
class Definitions:
    """All Feast objects of the project, by name."""

    entities: dict[str, Entity]
    sources: dict[str, FileSource]
    views: dict[str, FeatureView]
    services: dict[str, FeatureService]

    def objects(self) -> list:
        """Everything, in the order ``FeatureStore.apply`` takes."""
        return [*self.entities.values(), *self.sources.values(), *self.views.values(),
                *self.services.values()]


def view_schema(settings: Settings, view: str) -> dict[str, DType]:
    """Feature columns (after the keys and as_of) of ``view``, from the contract."""
    if view == MEMBER_VIEW:
        return member_feature_schema(tuple(settings.features.windows_days))
    if view == MEMBER_CATEGORY_VIEW:
        return dict(MEMBER_CATEGORY_FEATURE_SCHEMA)
    if view == ITEM_VIEW:
        return dict(ITEM_FEATURE_SCHEMA)
    if view == SCORES_VIEW:
        return dict(SCORES_SCHEMA)
    raise KeyError(f"unknown feature view {view!r}; the views are {', '.join(VIEW_KEYS)}")


def view_ttl(settings: Settings) -> timedelta:
    """Lookback of the point-in-time join (see the module docstring)."""
    return timedelta(days=settings.features.snapshot_every_days + settings.features.ttl_days)


def build_definitions(settings: Settings) -> Definitions:
    """The Feast entities, sources, views and services for ``settings``."""
    member = Entity(name=MEMBER_ENTITY, join_keys=[C.MEMBER_ID], value_type=ValueType.STRING,
                    description="A member of the programme.")
    item = Entity(name=ITEM_ENTITY, join_keys=[C.ITEM_ID], value_type=ValueType.STRING,
                  description="An item of the catalogue.")
    category = Entity(name=CATEGORY_ENTITY, join_keys=[C.CATEGORY], value_type=ValueType.STRING,
                      description="An item category (member x category features).")
    entities_of = {MEMBER_VIEW: [member], MEMBER_CATEGORY_VIEW: [member, category], ITEM_VIEW: [item]}
    ttl = view_ttl(settings)

    sources: dict[str, FileSource] = {}
    views: dict[str, FeatureView] = {}
    for view in (MEMBER_VIEW, MEMBER_CATEGORY_VIEW, ITEM_VIEW):
        keys = VIEW_KEYS[view]
        source = FileSource(
            name=f"{view}_source",
            path=snapshot_glob(settings, view),
            timestamp_field=C.AS_OF,
            description=f"Snapshots of {view}, one parquet file per as-of date.",
        )
        schema = [Field(name=k, dtype=String) for k in keys]
        schema += [Field(name=name, dtype=_FEAST_TYPES[dtype])
                   for name, dtype in view_schema(settings, view).items()]
        sources[view] = source
        views[view] = FeatureView(
            name=view, entities=entities_of[view], ttl=ttl, schema=schema, source=source, online=True,
            description=f"Feature snapshots of {view} (features.contract).",
        )

    scores_source = FileSource(
        name=f"{SCORES_VIEW}_source", path=str(settings.dirs.outputs / "scores" / "as_of=*" / SCORES_ONLINE_FILE),
        timestamp_field=C.AS_OF, description="repurchase score's answers, one file per scores partition.")
    sources[SCORES_VIEW] = scores_source
    views[SCORES_VIEW] = FeatureView(
        name=SCORES_VIEW, entities=[member], ttl=ttl, source=scores_source, online=True,
        schema=[Field(name=C.MEMBER_ID, dtype=String),
                *(Field(name=n, dtype=_FEAST_TYPES[t]) for n, t in SCORES_SCHEMA.items())],
        description="Every member's answers by the champion models (repurchase score), not features.")

    member_fv = views[MEMBER_VIEW]
    services = {
        CHURN_SERVICE: FeatureService(name=CHURN_SERVICE, features=[member_fv],
                                      description="Churn model: all member features."),
        NEXT_PURCHASE_SERVICE: FeatureService(name=NEXT_PURCHASE_SERVICE, features=[member_fv],
                                              description="Next-purchase model: all member features."),
        NEXT_PURCHASE_CATEGORY_SERVICE: FeatureService(
            name=NEXT_PURCHASE_CATEGORY_SERVICE, features=[member_fv, views[MEMBER_CATEGORY_VIEW]],
            description="Next purchase per replenishable category: member and member x category features; "
            "entity rows carry member_id and category."),
        VALUE_SERVICE: FeatureService(name=VALUE_SERVICE, features=[member_fv],
                                      description="Value model: all member features."),
        RECOMMENDER_SERVICE: FeatureService(
            name=RECOMMENDER_SERVICE, features=[member_fv, views[MEMBER_CATEGORY_VIEW], views[ITEM_VIEW]],
            description="Recommender: member, member x category and item features; entity rows carry "
            "member_id, category and item_id.",
        ),
        SERVING_SERVICE: FeatureService(name=SERVING_SERVICE, features=[member_fv],
                                        description="What the API reads online: member features."),
        SCORES_SERVICE: FeatureService(name=SCORES_SERVICE, features=[views[SCORES_VIEW]],
                                       description="Every member's scores, for campaign tools."),
    }
    return Definitions(entities={e.name: e for e in (member, item, category)}, sources=sources,
                       views=views, services=services)

"""Request and response bodies of the API (pydantic): what the OpenAPI page documents, with examples.

Requests reject unknown fields, non-finite numbers and strings that are not valid UTF-8 text, so every bad
input is a 422 that names the field (``serving.guard``) instead of an error deep in Feast or a model.
Responses are pydantic models, not dicts: BentoML builds the schema of a dict answer on every response.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from features.segments import STAGES


def _text(value: str) -> str:
    try:  # JSON can carry lone surrogates (\ud800), which no store can encode
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
    if any(ord(ch) < 32 for ch in value):
        raise ValueError("must not hold control characters")
    return value


Id = Annotated[str, StringConstraints(min_length=1, max_length=128), AfterValidator(_text)]
Label = Annotated[str, StringConstraints(min_length=1, max_length=256), AfterValidator(_text)]
TopN = Annotated[int, Field(ge=1, le=100, description="How many to return.")]
Stage = Literal[STAGES]  # type: ignore[valid-type]

MEMBER_EXAMPLE = "M0000042"
MAX_BATCH = 1000  # the schema's bound; settings.serving.max_batch may lower it


class _Request(BaseModel):
    # strict: `"n": false` or `"n": "5"` is a 422, not 0 or 5
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, str_strip_whitespace=False, strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="null")


# --- requests ------------------------------------------------------------------------------------------------


class ProfileRequest(_Request):
    member_id: Id = Field(description="The member's id as in the members file.", examples=[MEMBER_EXAMPLE])
    n: int = Field(10, ge=0, le=100, description="Recommendations in the profile (0: none).")


class ProfilesRequest(_Request):
    member_ids: list[Id] = Field(min_length=1, max_length=MAX_BATCH, description="Up to 1,000 members.",
                                 examples=[[MEMBER_EXAMPLE, "M0000043"]])
    n: int = Field(10, ge=0, le=100, description="Recommendations per profile (0: none).")


class _RecommendFilters(_Request):
    n: TopN = 10
    exclude_items: list[Label] = Field([], max_length=MAX_BATCH, description="Items never to recommend.")
    exclude_categories: list[Label] = Field([], max_length=MAX_BATCH, description="Categories never to "
                                            "recommend.")
    categories: list[Label] | None = Field(None, max_length=MAX_BATCH, description="Only items of these "
                                           "categories (null: any).", examples=[None])


class RecommendRequest(_RecommendFilters):
    member_id: Id = Field(examples=[MEMBER_EXAMPLE])


class RecommendBatchRequest(_RecommendFilters):
    member_ids: list[Id] = Field(min_length=1, max_length=MAX_BATCH, examples=[[MEMBER_EXAMPLE, "M0000043"]])


class BasketRequest(_Request):
    items: list[Label] = Field(min_length=1, max_length=100, description="Item ids in the basket.",
                               examples=[["I00012", "I00345"]])
    n: TopN = 10


class SimilarRequest(_Request):
    item_id: Label = Field(examples=["I00012"])
    n: TopN = 10


class SegmentMembersRequest(_Request):
    segment: Label | None = Field(None, description="An RFM segment (settings.rfm); give this or stage.",
                                  examples=["At risk"])
    stage: Stage | None = Field(None, description="A lifecycle stage; give this or segment.")
    page: int = Field(1, ge=1, le=1_000_000, description="1-based page.")
    page_size: int = Field(100, ge=1, le=10_000, description="Members per page (settings.serving.max_page_size "
                           "caps it).")


class Empty(_Request):
    pass


# --- responses -----------------------------------------------------------------------------------------------


class Churn(_Response):
    probability: float = Field(description="Calibrated P(no purchase in the churn horizon).")
    band: str = Field(description="low / medium / high (settings.training.churn_bands).")
    reasons: list[str] = Field(description="What pushes this member's risk up most, in plain words.")


class NextPurchase(_Response):
    expected_date: date | None = Field(description="Median date of the next purchase (null: beyond the horizon).")
    expected_days: float | None = Field(description="Days from the feature snapshot to the median.")
    interval_from: date | None = Field(description="Lower end of the central interval (settings.training.interval).")
    interval_to: date | None = Field(description="Upper end (null: beyond the horizon).")
    p_7d: float | None = Field(description="P(a purchase within 7 days of the snapshot).")
    p_30d: float | None = Field(description="P(a purchase within 30 days of the snapshot).")
    remind_at: date | None = Field(description="When to send a reminder.")
    beyond_horizon: bool = Field(description="The median is beyond the model's last period.")


class Value(_Response):
    expected_spend: float = Field(description="Expected spend over the next horizon_days.")
    horizon_days: int


class Recommendation(_Response):
    rank: int
    item_id: str
    score: float
    source: str = Field(description="als / own_history / popular.")
    because_item: str | None = Field(description="The bought item that explains an ALS pick.")
    reason: str


class MemberProfile(_Response):
    member_id: str
    known: bool = Field(description="The member is in the online store.")
    cold_start: bool = Field(description="Unknown member: scores are null and the recommendations are the "
                             "popular items; nothing here is about this member.")
    note: str | None = Field(None, description="Why the answer is a fallback, when it is.")
    as_of: date | None = Field(description="Date of the feature snapshot the answer is computed from.")
    feature_age_days: float | None = Field(description="Days from the snapshot to now.")
    stale: bool = Field(description="Older than settings.features.ttl_days, or no features at all.")
    churn: Churn | None
    next_purchase: NextPurchase | None
    value: Value | None
    rfm_segment: str | None
    lifecycle_stage: str | None
    recommendations: list[Recommendation]
    models: dict[str, str] = Field(description="Registered model -> version that answered.")
    source: Literal["live", "precomputed"] = Field(
        "live", description="live: the models ran on the online features now; precomputed: read from "
        "`repurchase score`'s partition made by the same model versions from the same snapshot.")


class Profiles(_Response):
    profiles: list[MemberProfile]


class Recommendations(_Response):
    member_id: str
    cold_start: bool
    recommendations: list[Recommendation]
    model_version: str


class RecommendationsBatch(_Response):
    members: list[Recommendations]


class GoesWith(_Response):
    item_id: str
    because: str = Field(description="The basket item of the strongest rule.")
    confidence: float
    lift: float
    count: int = Field(description="Baskets holding both.")
    support: float


class BasketCompletion(_Response):
    items: list[str]
    unknown: list[str] = Field(description="Basket items no rule knows.")
    goes_with: list[GoesWith]
    model_version: str


class SimilarItem(_Response):
    item_id: str
    score: float = Field(description="Cosine of the item-to-item ALS factors.")


class SimilarItems(_Response):
    item_id: str
    known: bool = Field(description="The item is in a basket the model saw (else the list is empty).")
    similar: list[SimilarItem]
    model_version: str


class SegmentMember(_Response):
    member_id: str
    rfm_segment: str | None
    lifecycle_stage: str | None
    recency_days: float | None
    orders_total: float | None


class SegmentMembers(_Response):
    segment: str | None
    stage: str | None
    as_of: date
    total: int
    page: int
    page_size: int
    pages: int
    members: list[SegmentMember]


class Pong(_Response):
    ok: bool = True


class Status(_Response):
    alias: str
    models: dict[str, str]
    loaded_at: str
    feature_service: str
    segments_as_of: date | None
    scores_as_of: date | None = Field(description="The `repurchase score` partition profiles are answered "
                                      "from (null: every profile is computed live).")
    reloads: int

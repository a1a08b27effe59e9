"""The BentoML service (1.4 class API): ``bentoml serve serving.service:Repurchase`` or ``repurchase serve``.

Configured by the settings (``serving`` section, read when this module is imported, because BentoML takes
workers and timeouts at decoration). Everything heavy (Feast, LightGBM, implicit, MLflow) is imported and
loaded in ``__init__``, which runs in each worker, not in the parent process that also imports this module.
Every API is ``async def`` and returns a pydantic model (PITFALLS: plain ``def`` runs one request at a time
per worker; dict answers rebuild a JSON schema per response). See ``serving.guard`` for keys and 422s.
"""

from __future__ import annotations

import gc
import logging
import threading
from typing import Any

import bentoml

from serving.guard import Guard
from serving.schemas import (
    BasketCompletion,
    BasketRequest,
    Empty,
    MemberProfile,
    Pong,
    ProfileRequest,
    Profiles,
    ProfilesRequest,
    Recommendations,
    RecommendationsBatch,
    RecommendBatchRequest,
    RecommendRequest,
    SegmentMembers,
    SegmentMembersRequest,
    SimilarItems,
    SimilarRequest,
    Status,
)

log = logging.getLogger(__name__)


def _settings() -> Any:
    from features.settings import load_settings

    return load_settings()


_SETTINGS = _settings()


def invalid(field: str, message: str, value: Any = None) -> None:
    """Raise the pydantic error BentoML answers 400 with (and ``Guard`` turns into 422 naming ``field``)."""
    from pydantic import ValidationError
    from pydantic_core import InitErrorDetails, PydanticCustomError

    raise ValidationError.from_exception_data(
        "request", [InitErrorDetails(type=PydanticCustomError("value_error", message), loc=(field,), input=value)])


def _json(answer: Any) -> Any:
    """``answer`` (a response model) as its JSON, sent as is. The route still declares the model (the
    OpenAPI schema); BentoML would otherwise dump the whole answer to Python objects once before dumping it
    to JSON (a fifth of a 1,000-member batch's time)."""
    from starlette.responses import Response

    return Response(content=answer.model_dump_json(), media_type="application/json")


@bentoml.service(
    name="repurchase",
    workers=_SETTINGS.serving.workers,
    traffic={"timeout": _SETTINGS.serving.timeout_s},
    logging={"access": {"enabled": False}},  # access lines cost ~40% (PITFALLS) and would log member traffic
    metrics={"enabled": True, "namespace": "repurchase"},
)
class Repurchase:
    """Member answers for campaign tools: profile, recommendations, basket completion, similar items,
    segment members. Send `Authorization: Bearer <key>`."""

    def __init__(self) -> None:
        from features.contract import C
        from features.definitions import SERVING_SERVICE, view_schema
        from features.lake import MEMBER_VIEW
        from serving.answers import SegmentIndex
        from serving.champions import ChampionWatcher, load_champions

        self.settings = _SETTINGS
        self.feature_service = SERVING_SERVICE
        self.served = {C.MEMBER_ID, *view_schema(self.settings, MEMBER_VIEW)}
        self.champions = load_champions(self.settings, self.served)
        self.segments = SegmentIndex.latest(self.settings)
        self.scores = None
        self._scores_key: Any = None
        self._refresh()
        self._lock = threading.Lock()
        self.watcher = ChampionWatcher(self.settings, self.champions, self.served, on_swap=self._swap,
                                       on_tick=self._refresh)
        self._warm_up()
        self.watcher.start()
        gc.collect()
        gc.freeze()  # long-lived model arrays out of the collector's way (PITFALLS: GC pauses in the tail)

    def _swap(self, champions: Any) -> None:
        self.champions = champions  # one reference: a request keeps the set it started with
        self._refresh(force=True)

    def _refresh(self, force: bool = False) -> None:
        """Reload the segment index and the scores partition when the latest snapshot or the partition
        changed (each poll of the watcher), or the models did (``force``)."""
        from features.lake import MEMBER_VIEW, snapshot_dates
        from serving.answers import SegmentIndex
        from training.scores import MANIFEST_FILE, latest_scores, partition

        dates = snapshot_dates(self.settings, MEMBER_VIEW)
        latest = dates[-1] if dates else None
        manifest = partition(self.settings, latest) / MANIFEST_FILE if latest else None
        key = (latest, manifest.stat().st_mtime_ns if manifest is not None and manifest.exists() else None,
               tuple(sorted(self.champions.versions.items())))
        if not force and key == self._scores_key:
            return
        if self.segments is None or self.segments.as_of != latest:
            self.segments = SegmentIndex.latest(self.settings)
        scores = None
        if self.settings.serving.use_scores:
            try:
                scores = latest_scores(self.settings, dict(self.champions.versions), latest)
            except (OSError, ValueError, KeyError) as e:  # a broken partition: answer live, say why
                log.warning("not answering from the scores of %s (answering live): %s", latest, e)
        self.scores, self._scores_key = scores, key
        if scores is not None:
            log.info("answering profiles from the scores of %s (%d members)", scores.as_of, len(scores.row))

    def _warm_up(self) -> None:
        from serving import answers

        ids = ["__warm_up__"]
        if self.segments is not None and len(self.segments.frame):
            ids.append(str(self.segments.frame.iloc[0, 0]))
        answers.profiles(self.settings, self.champions, self._features(ids), n=3)

    def _features(self, member_ids: list[str]) -> Any:
        from features.store import online_columns

        return online_columns(self.settings, member_ids, self.feature_service)

    def _profiles(self, member_ids: list[str], n: int) -> list[Any]:
        """Precomputed where the scores partition holds the member (same versions, latest snapshot), live
        for the rest (new and unknown members, or n above what the partition keeps), in the order asked."""
        from serving import answers

        champions, table = self.champions, self.scores
        out: list[Any] = [None] * len(member_ids)
        if table is not None and table.versions == champions.versions:
            out = answers.precomputed(self.settings, champions, table, member_ids, n)
        rest = [i for i, p in enumerate(out) if p is None]
        if rest:
            live = answers.profiles(self.settings, champions, self._features([member_ids[i] for i in rest]), n)
            for i, p in zip(rest, live, strict=True):
                out[i] = p
        return out

    def _batch(self, field: str, values: list[str]) -> None:
        if len(values) > self.settings.serving.max_batch:
            invalid(field, f"at most {self.settings.serving.max_batch} per call (settings.serving.max_batch), "
                    f"got {len(values)}")

    def __is_ready__(self) -> bool:
        return self.champions is not None

    @bentoml.api(route="/v1/profile", input_spec=ProfileRequest)
    async def profile(self, member_id: str, n: int = 10) -> MemberProfile:
        """Churn probability, band and reasons; next purchase (date, interval, P(7/30 days), remind-at); value;
        RFM segment; lifecycle stage; top-n recommendations. An unknown member gets `cold_start: true`."""

        return _json(self._profiles([member_id], n)[0])

    @bentoml.api(route="/v1/profiles", input_spec=ProfilesRequest)
    async def profiles(self, member_ids: list[str], n: int = 10) -> Profiles:
        """The profile of up to 1,000 members, in the order asked."""

        self._batch("member_ids", member_ids)
        return _json(Profiles(profiles=self._profiles(member_ids, n)))

    @bentoml.api(route="/v1/recommend", input_spec=RecommendRequest)
    async def recommend(self, member_id: str, n: int = 10, exclude_items: list[str] = (),
                        exclude_categories: list[str] = (), categories: list[str] | None = None) -> Recommendations:
        """Top-n items for a member, without the excluded items or categories, optionally only from
        `categories`. Reasons say why (bought before and due, because you bought X, popular)."""
        from serving import answers

        return answers.recommend(self.champions, [member_id], n, exclude_items, exclude_categories, categories)[0]

    @bentoml.api(route="/v1/recommend/batch", input_spec=RecommendBatchRequest)
    async def recommend_batch(self, member_ids: list[str], n: int = 10, exclude_items: list[str] = (),
                              exclude_categories: list[str] = (),
                              categories: list[str] | None = None) -> RecommendationsBatch:
        """Recommendations for up to 1,000 members, with the same filters for all."""
        from serving import answers

        self._batch("member_ids", member_ids)
        return RecommendationsBatch(members=answers.recommend(self.champions, member_ids, n, exclude_items,
                                                              exclude_categories, categories))

    @bentoml.api(route="/v1/basket", input_spec=BasketRequest)
    async def basket(self, items: list[str], n: int = 10) -> BasketCompletion:
        """What goes with the items in a basket (association rules: confidence, lift, count, support)."""
        from serving import answers

        champions = self.champions
        unknown, goes = answers.basket(champions, items, n)
        return BasketCompletion(items=items, unknown=unknown, goes_with=goes,
                                model_version=champions.versions["recommend"])

    @bentoml.api(route="/v1/similar", input_spec=SimilarRequest)
    async def similar(self, item_id: str, n: int = 10) -> SimilarItems:
        """Items bought in the same baskets as `item_id` (an unknown item: `known: false`, empty list)."""
        from serving import answers

        return answers.similar(self.champions, item_id, n)

    @bentoml.api(route="/v1/segment/members", input_spec=SegmentMembersRequest)
    async def segment_members(self, segment: str | None = None, stage: str | None = None, page: int = 1,
                              page_size: int = 100) -> SegmentMembers:
        """Members of one RFM segment or one lifecycle stage of the latest snapshot, by member id, paged."""
        if (segment is None) == (stage is None):
            invalid("segment", "give exactly one of segment and stage", None)
        names = self.settings.rfm.segment_names
        if segment is not None and segment not in names:
            invalid("segment", f"unknown segment; the segments are {', '.join(names)}", None)
        if page_size > self.settings.serving.max_page_size:
            invalid("page_size", f"at most {self.settings.serving.max_page_size} (settings.serving.max_page_size)")
        index = self.segments
        if index is None:
            raise bentoml.exceptions.ServiceUnavailable("no member snapshot yet: run the feature step first")
        return index.page(segment, stage, page, page_size)

    @bentoml.api(route="/v1/noop", input_spec=Empty)
    async def noop(self) -> Pong:
        """A constant answer behind the same key check: the floor the benchmark compares with."""
        return Pong()

    @bentoml.api(route="/v1/status", input_spec=Empty)
    async def status(self) -> Status:
        """The alias, the model versions answering now, when they were loaded, and how often they swapped."""
        c = self.champions
        return Status(alias=c.alias, models=dict(c.versions), loaded_at=c.loaded_at.isoformat(),
                      feature_service=self.feature_service,
                      segments_as_of=None if self.segments is None else self.segments.as_of,
                      scores_as_of=None if self.scores is None else self.scores.as_of,
                      reloads=self.watcher.swaps)


Repurchase.add_asgi_middleware(Guard, keys=_SETTINGS.serving.api_keys, open_docs=_SETTINGS.serving.open_docs)

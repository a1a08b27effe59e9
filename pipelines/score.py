"""``repurchase score``: every member's answers as of a date, by the models at an alias, into
``<outputs>/scores/as_of=DATE/`` (training.scores) and a run in MLflow with the manifest.

The answers also go to the Feast online store, view ``member_scores`` (``features.definitions``), for
campaign tools that read members by id.

The features are the serving FeatureService's, read through Feast's offline store at the snapshot's as_of
(``features.store.training_frame``): the values the online store was materialized from, so the API can
answer from these scores instead of running the models per request when the versions and the date match.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, date, datetime
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from features.contract import C
from features.settings import Settings

log = logging.getLogger(__name__)


def score(settings: Settings, as_of: date | None = None, alias: str | None = None) -> dict[str, Any]:
    """Score every member of the member snapshot of ``as_of`` (default the latest) with the models at
    ``alias`` (default ``settings.serving.alias``); write the partition and log the run. Returns the
    manifest (with the partition's path)."""
    from features.definitions import SCORES_ONLINE_FILE, SCORES_VIEW, SERVING_SERVICE, view_schema
    from features.lake import MEMBER_VIEW, snapshot_dates, snapshot_path
    from features.online import require_view, write_online
    from features.store import training_frame
    from serving.champions import load_champions
    from training.scores import score_members, write_scores

    t0 = time.perf_counter()
    dates = snapshot_dates(settings, MEMBER_VIEW)
    if not dates:
        raise LookupError(f"no member snapshot under {settings.dirs.features}: run `repurchase features build`")
    as_of = as_of or dates[-1]
    if as_of not in dates:
        raise LookupError(f"no member snapshot as of {as_of} (there are {len(dates)}, the latest "
                          f"{dates[-1]}): run `repurchase features build --as-of {as_of}` first")
    require_view(settings, SCORES_VIEW)  # before the work: the scores go to the online store at the end
    served = {C.MEMBER_ID, *view_schema(settings, MEMBER_VIEW)}
    champions = load_champions(settings, served, alias)
    n = settings.serving.precomputed_recommendations
    t = time.perf_counter()
    snapshot = snapshot_path(settings, MEMBER_VIEW, as_of.isoformat())
    if settings.features.engine == "spark":
        from training.spark_scores import score_on_spark

        # the snapshot file is the Feast offline source of this date: the rows training_frame returns
        members, recs, seconds = score_on_spark(settings, champions.churn, champions.next_purchase,
                                                champions.value, champions.recommender, snapshot, n)
        read_s = 0.0
    else:
        ids = pd.read_parquet(snapshot, columns=[C.MEMBER_ID])
        entity = pd.DataFrame({C.MEMBER_ID: ids[C.MEMBER_ID].astype(str),
                               C.EVENT_TIMESTAMP: pd.Timestamp(as_of, tz="UTC")})
        features = training_frame(settings, entity, SERVING_SERVICE)
        read_s = time.perf_counter() - t
        members, recs, seconds = score_members(settings, champions.churn, champions.next_purchase,
                                               champions.value, champions.recommender, features, n)
    manifest = {"alias": champions.alias, "versions": dict(champions.versions),
                "feature_service": SERVING_SERVICE, "recommend_n": n, "engine": settings.features.engine,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "seconds": {"features": round(read_s, 3), **seconds}}
    t = time.perf_counter()
    path = write_scores(settings, as_of, members, recs, manifest)
    manifest["seconds"]["write"] = round(time.perf_counter() - t, 3)
    online = write_online(settings, SCORES_VIEW, pq.read_table(path / SCORES_ONLINE_FILE))
    manifest["seconds"]["online"] = round(online.seconds, 3)
    manifest["online"] = {"view": SCORES_VIEW, "rows": online.rows, "method": online.method}
    manifest["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    manifest |= {"as_of": as_of.isoformat(), "members": len(members), "recommendation_rows": len(recs),
                 "path": str(path)}
    manifest["run_id"] = _log_run(settings, manifest)
    return manifest


def _log_run(settings: Settings, manifest: dict[str, Any]) -> str:
    from training.tracking import log_report_run

    params = {**{f"version.{k}": v for k, v in manifest["versions"].items()},
              "feature_service": manifest["feature_service"], "recommend_n": manifest["recommend_n"]}
    metrics = {"members": manifest["members"], "recommendation_rows": manifest["recommendation_rows"],
               **{f"seconds.{k}": v for k, v in manifest["seconds"].items()}}
    return log_report_run(settings, "scoring", f"score {manifest['as_of']}", params, metrics, manifest,
                          tags={"as_of": manifest["as_of"], "alias": manifest["alias"]})

"""``repurchase score``: every member's answers as of a date, by the models at an alias, into
``<outputs>/scores/as_of=DATE/`` (training.scores) and a run in MLflow with the manifest.

The features are the serving FeatureService's, read through Feast's offline store at the snapshot's as_of
(``features.store.training_frame``): the values the online store was materialized from, so the API can
answer from these scores instead of running the models per request when the versions and the date match.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from features.contract import C
from features.settings import Settings

log = logging.getLogger(__name__)


def score(settings: Settings, as_of: date | None = None, alias: str | None = None) -> dict[str, Any]:
    """Score every member of the member snapshot of ``as_of`` (default the latest) with the models at
    ``alias`` (default ``settings.serving.alias``); write the partition and log the run. Returns the
    manifest (with the partition's path)."""
    from features.definitions import SERVING_SERVICE, view_schema
    from features.lake import MEMBER_VIEW, snapshot_dates, snapshot_path
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
    served = {C.MEMBER_ID, *view_schema(settings, MEMBER_VIEW)}
    champions = load_champions(settings, served, alias)
    t = time.perf_counter()
    ids = pd.read_parquet(snapshot_path(settings, MEMBER_VIEW, as_of.isoformat()), columns=[C.MEMBER_ID])
    entity = pd.DataFrame({C.MEMBER_ID: ids[C.MEMBER_ID].astype(str),
                           C.EVENT_TIMESTAMP: pd.Timestamp(as_of, tz="UTC")})
    features = training_frame(settings, entity, SERVING_SERVICE)
    read_s = time.perf_counter() - t
    n = settings.serving.precomputed_recommendations
    members, recs, seconds = score_members(settings, champions.churn, champions.next_purchase, champions.value,
                                           champions.recommender, features, n)
    manifest = {"alias": champions.alias, "versions": dict(champions.versions),
                "feature_service": SERVING_SERVICE, "recommend_n": n,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "seconds": {"features": round(read_s, 3), **seconds}}
    t = time.perf_counter()
    path = write_scores(settings, as_of, members, recs, manifest)
    manifest["seconds"]["write"] = round(time.perf_counter() - t, 3)
    manifest["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    manifest |= {"as_of": as_of.isoformat(), "members": len(members), "recommendation_rows": len(recs),
                 "path": str(path)}
    manifest["run_id"] = _log_run(settings, manifest)
    return manifest


def _log_run(settings: Settings, manifest: dict[str, Any]) -> str:
    from training.tracking import _experiment_id, client, code_version

    mlc = client(settings)
    run = mlc.create_run(_experiment_id(settings, mlc), run_name=f"score {manifest['as_of']}",
                         tags={"kind": "scoring", "as_of": manifest["as_of"], "alias": manifest["alias"],
                               "code_version": code_version()})
    rid = run.info.run_id
    try:
        for name, version in manifest["versions"].items():
            mlc.log_param(rid, f"version.{name}", version)
        mlc.log_param(rid, "feature_service", manifest["feature_service"])
        mlc.log_param(rid, "recommend_n", manifest["recommend_n"])
        mlc.log_metric(rid, "members", manifest["members"])
        mlc.log_metric(rid, "recommendation_rows", manifest["recommendation_rows"])
        for step, s in manifest["seconds"].items():
            mlc.log_metric(rid, f"seconds.{step}", s)
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "manifest.json"
            p.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
            mlc.log_artifact(rid, str(p))
        mlc.set_terminated(rid, "FINISHED")
    except Exception:
        mlc.set_terminated(rid, "FAILED")
        raise
    return rid

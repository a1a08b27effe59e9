"""Batch scoring on Spark: :func:`training.scores.score_members` run by pandas UDFs over partitions.

The member snapshot is read by Spark and repartitioned by member; ``mapInPandas`` hands each partition's
Arrow batches to the same code the DuckDB path runs (``score_members`` for churn with reasons, next purchase,
value, segment and stage; ``Recommender.recommend`` for the top n), on the executors, with the champion
models shipped to every executor once (``SparkContext.addFile``) and loaded once per Python worker. The
executors write their rows as parquet parts into a temporary folder beside the snapshot (the shared file
system the lake is on); the driver reads the parts with Arrow (not through Spark's result collection, so
neither ``spark.driver.maxResultSize`` nor the JVM heap bounds it) and writes the partition exactly as the
DuckDB path does, so the API, the lists and the online store cannot tell the engines apart. The partition
is therefore still assembled in the driver's memory (docs/scale.md says where that stops). On a cluster the
executors need this package installed (the same ``uv sync`` environment, or a packed one through
``spark.archives``).

Example::

    members, recs, seconds = score_on_spark(settings, champions, snapshot_file, n=20)
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from features.contract import C
from features.settings import Settings
from features.spark import parts_of
from training.models import ChurnModel, ValueModel, load_model
from training.next_purchase import NextPurchaseModel
from training.recommend import RC, Recommender
from training.scores import SC, _member_columns, score_members

MEMBERS_PER_PARTITION = 200_000
_FILES = {"churn": "churn.json", "next_purchase": "next_purchase.json", "value": "value.json",
          "recommender": "recommender.npz"}
_loaded: dict[str, dict[str, Any]] = {}  # per Python worker: models folder name -> models
_lock = threading.Lock()


def _members_schema() -> str:
    types = {SC.CHURN_P: "double", SC.REASONS: "array<string>", SC.VALUE: "double"}
    types |= {c: ("boolean" if c.endswith("beyond_horizon") else "double") for c in SC.NP_COLUMNS}
    return ", ".join(f"`{c}` {types.get(c, 'string')}" for c in _member_columns())


_RECS_TYPES = {RC.MEMBER_ID: "string", RC.RANK: "bigint", RC.ITEM_ID: "string", RC.SCORE: "double",
               RC.SOURCE: "string", RC.BECAUSE: "string", RC.REASON: "string", RC.COLD_START: "boolean"}
_RECS_SCHEMA = ", ".join(f"`{c}` {_RECS_TYPES[c]}" for c in RC.COLUMNS)


def _models(folder: str, settings: Settings) -> dict[str, Any]:
    """The models shipped as ``folder`` (SparkFiles), loaded once per Python worker process."""
    from pyspark import SparkFiles

    with _lock:
        if folder not in _loaded:
            root = Path(SparkFiles.get(folder))
            _loaded.clear()  # one set at a time: a new scoring run ships a new folder
            _loaded[folder] = {
                **{k: load_model(root / _FILES[k], settings=settings) for k in ("churn", "next_purchase", "value")},
                "recommender": Recommender.load(root / _FILES["recommender"], settings=settings)}
        return _loaded[folder]


def _score_batches(settings_json: str, folder: str) -> Any:
    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        settings = Settings.model_validate_json(settings_json)
        m = _models(folder, settings)
        for frame in batches:
            if len(frame):
                members, _, _ = score_members(settings, m["churn"], m["next_purchase"], m["value"],
                                              m["recommender"], frame, n=0)
                yield members[_member_columns()]
    return run


def _recommend_batches(settings_json: str, folder: str, n: int) -> Any:
    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        settings = Settings.model_validate_json(settings_json)
        rec = _models(folder, settings)["recommender"]
        for frame in batches:
            if len(frame):
                out = rec.recommend(frame[C.MEMBER_ID].astype(str).tolist(), n=n)
                yield out[list(RC.COLUMNS)].astype({RC.RANK: "int64", RC.SCORE: "float64", RC.COLD_START: "bool"})
    return run


def _through_parts(frame: Any, beside: Path) -> pd.DataFrame:
    """``frame``'s rows as pandas: written as parquet parts by the executors, read back by the driver."""
    import pyarrow.dataset as ds

    with parts_of(frame, beside) as files:
        if not files:  # no member in any partition
            return pd.DataFrame({f.name: [] for f in frame.schema.fields})
        return ds.dataset([str(f) for f in files], format="parquet").to_table().to_pandas()


def score_on_spark(settings: Settings, churn: ChurnModel, next_purchase: NextPurchaseModel, value: ValueModel,
                   recommender: Recommender, features_file: Path, n: int,
                   spark: Any = None) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float]]:
    """(members, recommendations, seconds) as :func:`training.scores.score_members` returns them, for every
    row of the parquet file ``features_file`` (a member snapshot), computed on Spark."""
    from features.spark import spark_session

    spark = spark or spark_session(settings)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="repurchase-spark-") as tmp:
        folder = Path(tmp) / f"models-{uuid.uuid4().hex[:12]}"  # a fresh name: addFile refuses a reused one
        folder.mkdir()
        for key, model in (("churn", churn), ("next_purchase", next_purchase), ("value", value),
                           ("recommender", recommender)):
            model.save(folder / _FILES[key])
        spark.sparkContext.addFile(str(folder), recursive=True)
        seconds["ship_models"] = time.perf_counter() - t
        frame = spark.read.parquet(str(features_file))
        rows = frame.count()
        if frame.select(C.MEMBER_ID).distinct().count() != rows:
            raise ValueError(f"{features_file} holds a member more than once; scores are one row per member")
        parts = settings.spark.score_partitions or max(spark.sparkContext.defaultParallelism,
                                                       math.ceil(rows / MEMBERS_PER_PARTITION))
        frame = frame.repartition(parts, C.MEMBER_ID)
        conf = json.dumps(settings.model_dump(mode="json"))
        t = time.perf_counter()
        members = _through_parts(
            frame.mapInPandas(_score_batches(conf, folder.name), schema=_members_schema()), Path(features_file))
        seconds["models"] = time.perf_counter() - t
        t = time.perf_counter()
        if n > 0:
            recs = _through_parts(frame.select(C.MEMBER_ID).mapInPandas(
                _recommend_batches(conf, folder.name, n), schema=_RECS_SCHEMA), Path(features_file))
        else:
            recs = pd.DataFrame({c: [] for c in RC.COLUMNS})
        seconds["recommend"] = time.perf_counter() - t
    members = members.sort_values(SC.MEMBER_ID, kind="mergesort").reset_index(drop=True)
    members[SC.REASONS] = [list(r) for r in members[SC.REASONS]]
    for c in (SC.CHURN_BAND, SC.RFM_SEGMENT, SC.LIFECYCLE_STAGE, SC.MEMBER_ID):
        members[c] = members[c].astype(object)
    recs = recs.sort_values([RC.MEMBER_ID, RC.RANK], kind="mergesort").reset_index(drop=True)
    recs[RC.BECAUSE] = recs[RC.BECAUSE].astype("string")
    return members, recs, {k: round(v, 3) for k, v in seconds.items()}

"""Recommendation and basket workloads behind ``repurchase train recommend``, ``backtest recommend``,
``rules`` and ``recommend``: orchestration only (the methods are in training.recommend, training.basket).

``backtest`` tunes on the window before the cutoff, fits on the lines before it and judges the model and
the baselines on the window after it (training.recommend_eval). ``train`` runs that backtest at the latest
cutoff whose window is inside the data, then refits the same parameters on every line (so new items and
members are known), fits the basket rules and the similar-items model on every basket, logs all of it to
MLflow and registers it as ``recommend`` (challenger): the promotion gate compares versions on the same
backtest. ``batch`` writes the top-N of every member for serving.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from features.contract import C
from features.settings import Settings

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def _noop(_msg: str) -> None:
    return None


def _with_horizon(settings: Settings, horizon_days: int | None) -> Settings:
    if horizon_days is None:
        return settings
    if horizon_days < 1:
        raise ValueError(f"--horizon must be at least 1 day, got {horizon_days}")
    return settings.model_copy(update={"recommend": settings.recommend.model_copy(
        update={"horizon_days": int(horizon_days)})})


def read_inputs(settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(transactions, items, members) of the lake; items and members may be empty frames."""
    from training.dataset import read_lake_table

    lines = read_lake_table(settings, "transactions", columns=[C.MEMBER_ID, C.ORDER_ID, C.TS, C.ITEM_ID,
                                                                C.CATEGORY, C.IS_RETURN])
    frames = []
    for table in ("items", "members"):
        try:
            frames.append(read_lake_table(settings, table))
        except FileNotFoundError:
            frames.append(pd.DataFrame())
    return lines, frames[0], frames[1]


def latest_cutoff(settings: Settings, lines: pd.DataFrame) -> date:
    """The latest cutoff whose test window (``recommend.horizon_days``) ends within the data."""
    last = pd.Timestamp(lines[C.TS].max()).tz_convert("UTC").date()
    return last - timedelta(days=settings.recommend.horizon_days - 1)


def run_backtest(settings: Settings, cutoff: date, k: int = 10, horizon_days: int | None = None,
                 tune_params: bool = True, inputs: tuple | None = None,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Tune (within settings' bounds), fit and judge at ``cutoff``; the report and the fitted model."""
    from training.dataset import data_fingerprint
    from training.recommend import Recommender
    from training.recommend_eval import evaluate, time_split, tune

    progress = progress or _noop
    s = _with_horizon(settings, horizon_days)
    lines, items, members = inputs or read_inputs(s)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    split = time_split(lines, cutoff, s.recommend.horizon_days)
    tuning = None
    best: dict[str, Any] = {}
    if tune_params and s.recommend.trials:
        progress(f"tuning the recommender ({s.recommend.trials} trials at most) on the window before {cutoff}")
        import mlflow

        # trials are nested runs of the caller's run (train, backtest); with none active nothing is logged
        tuning = tune(s, lines, items, members, cutoff, k=k, log_to_mlflow=mlflow.active_run() is not None)
        best = tuning.best_params
    seconds["tune"] = time.perf_counter() - t
    t = time.perf_counter()
    progress(f"fitting ALS on {len(split.train):,} purchase lines before {cutoff}")
    rec = Recommender(s, **best).fit(split.train, items, members, cutoff=split.cutoff)
    seconds["fit"] = time.perf_counter() - t
    t = time.perf_counter()
    progress(f"judging the model and the baselines on {len(split.members):,} members")
    metrics = evaluate(rec, split, k)
    seconds["evaluate"] = time.perf_counter() - t
    truth = pd.DataFrame({C.MEMBER_ID: list(split.truth), "items": [",".join(map(str, sorted(v)))
                                                                    for v in split.truth.values()]})
    return {"kind": "recommend", "cutoff": cutoff.isoformat(), "horizon_days": s.recommend.horizon_days,
            "k": k, "train_lines": len(split.train), "members": len(split.members),
            "cold_members": split.cold_members, "tuning_trials": tuning.trials if tuning else 0,
            "tuning": None if tuning is None else {"best": tuning.best, "default": tuning.default,
                                                   "params": tuning.best_params},
            "params": rec.params, "seconds": {k_: round(v, 2) for k_, v in seconds.items()},
            "metrics": metrics, "_model": rec, "_train_fingerprint": data_fingerprint(split.train),
            "_backtest_fingerprint": data_fingerprint(truth)}


def public(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if not k.startswith("_")}


def fit_basket(settings: Settings, lines: pd.DataFrame, items: pd.DataFrame) -> tuple[pd.DataFrame, Any]:
    """Rules (settings.basket) and the similar-items model on every basket of ``lines``."""
    from training.basket import Baskets, SimilarItems, association_rules

    b = settings.basket
    baskets = Baskets.from_lines(lines, by=b.by, items=items if len(items) else None)
    rules = association_rules(baskets, min_count=b.min_count, min_support=b.min_support,
                              min_confidence=b.min_confidence, min_lift=b.min_lift)
    similar = SimilarItems(b.similar_factors, b.similar_iterations, seed=settings.recommend.seed,
                           num_threads=settings.recommend.num_threads).fit(baskets)
    return rules, similar


def train(settings: Settings, cutoff: date | None = None, k: int = 10,
          progress: Progress | None = None) -> dict[str, Any]:
    """Backtest at ``cutoff`` (default: the latest), refit on all lines, fit the basket models, log and
    register ``recommend`` as challenger."""
    import mlflow

    from training.recommend import Recommender
    from training.tracking import _experiment_id, client, log_recommend_run

    progress = progress or _noop
    t0 = time.perf_counter()
    inputs = read_inputs(settings)
    lines, items, members = inputs
    cut = cutoff or latest_cutoff(settings, lines)
    mlflow.set_tracking_uri(settings.tracking_uri)
    exp = _experiment_id(settings, client(settings))
    with mlflow.start_run(experiment_id=exp, run_name=f"train-recommend-{cut}"), \
            tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tags({"purpose": "train", "model_kind": "recommend"})
        rep = run_backtest(settings, cut, k, inputs=inputs, progress=progress)
        progress("refitting on every purchase line, and the basket rules and similar items")
        final = Recommender(settings, **rep["params"]).fit(lines, items, members)
        rules, similar = fit_basket(settings, lines, items)
        artifacts = {"model": final.save(Path(tmp) / "recommender.npz"),
                     "similar": similar.save(Path(tmp) / "similar_items.npz")}
        rules_path = Path(tmp) / "rules.parquet"
        rules.to_parquet(rules_path, index=False)
        artifacts["rules"] = rules_path
        run = log_recommend_run(settings, final, artifacts, rep["metrics"],
                                train_fingerprint=rep["_train_fingerprint"], backtest_cutoff=rep["cutoff"],
                                backtest_fingerprint=rep["_backtest_fingerprint"],
                                params={"k": k, "horizon_days": rep["horizon_days"], "rules": len(rules),
                                        "tuning.trials": rep["tuning_trials"]})
    out = public(rep)
    out.update(registered_model="recommend", run_id=run.run_id, version=run.version, rules=len(rules),
               seconds_total=round(time.perf_counter() - t0, 1))
    return out


def backtest_file(settings: Settings, cutoff: date, data: list[Path], mapping: str | Path, k: int = 10,
                  horizon_days: int | None = None, tune_params: bool = True,
                  progress: Progress | None = None) -> dict[str, Any]:
    """Ingest ``data`` through ``mapping`` into a temporary workspace and backtest there (nothing outside it
    is written); the ingest counts come back under ``ingest``."""
    from pipelines.models import ingested_workspace

    with ingested_workspace(settings, data, mapping, progress) as (s, counts):
        out = backtest(s, cutoff, k, horizon_days, tune_params=tune_params, progress=progress)
    out["ingest"] = counts
    return out


def backtest(settings: Settings, cutoff: date, k: int = 10, horizon_days: int | None = None,
             tune_params: bool = True, progress: Progress | None = None) -> dict[str, Any]:
    """:func:`run_backtest` on the workspace, logged as an unregistered MLflow run with its trials."""
    import mlflow

    from training.tracking import _experiment_id, client, mlflow_metric

    mlflow.set_tracking_uri(settings.tracking_uri)
    exp = _experiment_id(settings, client(settings))
    with mlflow.start_run(experiment_id=exp, run_name=f"backtest-recommend-{cutoff}") as run:
        mlflow.set_tags({"purpose": "backtest", "model_kind": "recommend"})
        rep = run_backtest(settings, cutoff, k, horizon_days, tune_params=tune_params, progress=progress)
        mlflow.log_params({"k": k, "horizon_days": rep["horizon_days"],
                           **{f"als.{p}": v for p, v in rep["params"].items()}})
        mlflow.log_metrics({(mlflow_metric(m) if method == "model" else f"{method}.{mlflow_metric(m)}"): v
                            for method, vals in rep["metrics"].items() for m, v in vals.items()})
    out = public(rep)
    out["run_id"] = run.info.run_id
    return out


def rules(settings: Settings, by: str | None = None, basket: list[str] | None = None,
          top: int | None = None, min_count: int | None = None,
          min_confidence: float | None = None) -> dict[str, Any]:
    """The top rules of the lake's baskets (by lift), or with ``basket`` what goes with those items."""
    from training.basket import Baskets, R, association_rules, goes_with

    b = settings.basket
    lines, items, _ = read_inputs(settings)
    t = time.perf_counter()
    level = by or b.by
    baskets = Baskets.from_lines(lines, by=level, items=items if len(items) else None)  # type: ignore[arg-type]
    found = association_rules(baskets, min_count=min_count or b.min_count, min_support=b.min_support,
                              min_confidence=b.min_confidence if min_confidence is None else min_confidence,
                              min_lift=b.min_lift)
    n = top or b.top
    out: dict[str, Any] = {"by": level, "baskets": baskets.n, "labels": len(baskets.labels),
                           "rules_found": len(found), "seconds": round(time.perf_counter() - t, 3)}
    if basket:
        unknown = [x for x in basket if x not in set(baskets.labels.astype(str))]
        out["basket"] = basket
        out["unknown"] = unknown
        out["goes_with"] = goes_with(found, basket, top=n).to_dict(orient="records")
    else:
        out["rules"] = found.head(n)[list(R.COLUMNS)].to_dict(orient="records")
    return out


def registered(settings: Settings, alias: str = "champion") -> tuple[Any, pd.DataFrame, Any, str]:
    """(recommender, rules, similar items, version) of ``recommend@alias`` from the MLflow registry."""
    from training.basket import SimilarItems
    from training.recommend import Recommender
    from training.tracking import RECOMMEND_MODEL, download_registered

    version, art = download_registered(settings, RECOMMEND_MODEL, alias)
    rec = Recommender.load(art / "recommender.npz", settings=settings)
    return rec, pd.read_parquet(art / "rules.parquet"), SimilarItems.load(art / "similar_items.npz"), version


def batch(settings: Settings, out: Path, alias: str = "champion", n: int | None = None,
          chunk: int = 100_000) -> dict[str, Any]:
    """Top-``n`` of every member the recommender knows, plus every member of the members table (cold
    start), written atomically to ``out`` (parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from features.lake import atomic_path

    rec, _, _, version = registered(settings, alias)
    _, _, members = read_inputs(settings)
    ids = pd.Index(rec.members)
    if len(members):
        ids = ids.append(pd.Index(members[C.MEMBER_ID].astype(str)).difference(ids))
    t = time.perf_counter()
    rows = 0
    with atomic_path(Path(out)) as tmp:
        writer = None
        for lo in range(0, len(ids), chunk):
            frame = rec.recommend(list(ids[lo: lo + chunk]), n=n)
            table = pa.Table.from_pandas(frame.astype({"because_item": "string"}), preserve_index=False)
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            rows += len(frame)
        if writer is not None:
            writer.close()
    return {"out": str(out), "version": version, "members": len(ids), "rows": rows,
            "seconds": round(time.perf_counter() - t, 2)}

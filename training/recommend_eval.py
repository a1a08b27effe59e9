"""Top-K evaluation of recommendations on a time split, the baselines beside the model, and tuning.

The split at ``cutoff``: every method learns from the purchase lines strictly before it and is judged on
the distinct items each member bought in ``[cutoff, cutoff + horizon_days)`` (re-purchases count: buying
again is most of what members do). Judged members are those with a purchase on both sides of the cutoff
(members with no history get the cold-start list and are counted apart). Per member, with ``T`` the items
bought after the cutoff and ``hit_j`` whether the j-th recommendation is in ``T``:

- ``recall@K`` = hits / |T|; ``precision@K`` = hits / K;
- ``ndcg@K`` = sum_j hit_j / log2(j + 1) over the ideal for min(K, |T|) hits;
- ``map@K`` = sum_j precision@j hit_j / min(K, |T|);

each averaged over the judged members, and ``coverage@K`` = distinct items recommended / items in the
training catalogue. Items first sold after the cutoff stay in ``T`` (no method can hit them; the figure
is honest about that).

Methods: ``model`` (:class:`training.recommend.Recommender`, the repurchase-aware ranking), ``popularity``
(the most-bought items of the last ``popular_days``, the same for everyone), ``own_history`` (the member's
items by purchase days, latest first on ties, then popular items), ``item_knn`` (implicit's
``CosineRecommender`` on the same weights, bought items allowed) and ``als`` (the model's ALS scores
alone, bought items allowed).

Tuning (:func:`tune`) fits on the lines before ``cutoff - w`` and scores recall@K on the window ``w`` up
to ``cutoff`` (``w`` = ``horizon_days``, or half the history before the cutoff when that is shorter): the
test window is never seen.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import numpy as np
import pandas as pd

from features.contract import C
from features.settings import Settings
from training.recommend import DAY, PARAMS, History, Recommender, _utc, purchase_lines
from training.tuning import log_trial

log = logging.getLogger(__name__)

METHODS = ("model", "popularity", "own_history", "item_knn", "als")
PROMOTION_METRIC = "recall@10"


def metric_names(k: int) -> list[str]:
    return [f"recall@{k}", f"precision@{k}", f"ndcg@{k}", f"map@{k}", f"coverage@{k}"]


@dataclass(frozen=True)
class Split:
    """Training lines, the judged members and what they bought in the window."""

    cutoff: pd.Timestamp
    horizon_days: int
    train: pd.DataFrame
    members: pd.Index  # judged: bought on both sides
    truth: dict[Any, np.ndarray]  # member -> distinct item ids bought in the window
    cold_members: int  # bought in the window with no history before it


def time_split(lines: pd.DataFrame, cutoff: date | str | pd.Timestamp, horizon_days: int,
               data_end: pd.Timestamp | None = None) -> Split:
    """The split at ``cutoff``; the window must end within the data (its last purchase, or ``data_end``
    when ``lines`` were cut earlier), else an error saying so. Lines from the window's end on are unused."""
    p = purchase_lines(lines)
    cut = _utc(cutoff)
    end = cut + horizon_days * DAY
    last = p[C.TS].max() if data_end is None else data_end
    if pd.isna(last) or last < end - DAY:
        raise ValueError(f"the test window {cut.date()} + {horizon_days} days ends after the data "
                         f"(last purchase {None if pd.isna(last) else last.date()}): choose an earlier cutoff "
                         "or a shorter horizon")
    train = p[p[C.TS] < cut]
    if train.empty:
        raise ValueError(f"no purchases before the cutoff {cut.date()}")
    test = p[(p[C.TS] >= cut) & (p[C.TS] < end)]
    known = pd.Index(train[C.MEMBER_ID].unique())
    judged = test[test[C.MEMBER_ID].isin(known)]
    truth = {m: g.unique() for m, g in judged.groupby(C.MEMBER_ID, sort=True)[C.ITEM_ID]}
    cold = int(test.loc[~test[C.MEMBER_ID].isin(known), C.MEMBER_ID].nunique())
    return Split(cut, horizon_days, train, pd.Index(sorted(truth)), truth, cold)


def topk_metrics(recs: np.ndarray, split: Split, items: pd.Index, k: int) -> dict[str, float]:
    """Metrics (module docstring) of ``recs``: judged members x k item codes over ``items`` (-1 = none)."""
    recs = recs[:, :k]
    m = len(split.members)
    hits = np.zeros(recs.shape, dtype=bool)
    sizes = np.zeros(m)
    for r, member in enumerate(split.members):
        t = items.get_indexer(split.truth[member])
        sizes[r] = len(t)
        hits[r] = np.isin(recs[r], t[t >= 0]) & (recs[r] >= 0)
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.cumsum(disc)[np.minimum(sizes, k).astype(int) - 1]
    n_hits = hits.sum(axis=1)
    prec_at = np.cumsum(hits, axis=1) / np.arange(1, k + 1)
    shown = np.unique(recs[recs >= 0])
    return {f"recall@{k}": float(np.mean(n_hits / sizes)), f"precision@{k}": float(np.mean(n_hits / k)),
            f"ndcg@{k}": float(np.mean((hits * disc).sum(axis=1) / ideal)),
            f"map@{k}": float(np.mean((prec_at * hits).sum(axis=1) / np.minimum(sizes, k))),
            f"coverage@{k}": float(len(shown) / max(len(items), 1)), "members": float(m),
            "cold_members": float(split.cold_members)}


def _as_array(frame: pd.DataFrame, members: pd.Index, items: pd.Index, k: int) -> np.ndarray:
    out = np.full((len(members), k), -1, dtype=np.int64)
    r = members.get_indexer(frame[C.MEMBER_ID])
    out[r, frame["rank"].to_numpy() - 1] = items.get_indexer(frame[C.ITEM_ID])
    return out


def model_recs(rec: Recommender, members: pd.Index, k: int) -> np.ndarray:
    return _as_array(rec.recommend(list(members), n=k), members, rec.items, k)


def popularity_recs(rec: Recommender, members: pd.Index, k: int) -> np.ndarray:
    top = rec.popular[""][:k]
    out = np.full((len(members), k), -1, dtype=np.int64)
    out[:, : len(top)] = top
    return out


def own_history_recs(rec: Recommender, members: pd.Index, k: int) -> np.ndarray:
    h = rec.history
    assert h is not None
    rows = h.rows(members)
    top = rec.popular[""]
    out = np.full((len(members), k), -1, dtype=np.int64)
    for r, row in enumerate(rows):
        sl = slice(h.indptr[row], h.indptr[row + 1])
        items, days, since = h.indices[sl], h.count[sl], h.days_since[sl]
        order = np.lexsort((since, -days))  # most purchase days first, then the latest
        mine = items[order][:k]
        fill = top[~np.isin(top, mine)][: k - len(mine)]
        both = np.concatenate([mine, fill])
        out[r, : len(both)] = both
    return out


def _als_like_recs(model: Any, rec: Recommender, members: pd.Index, k: int) -> np.ndarray:
    h = rec.history
    assert h is not None
    rows = h.rows(members)
    conf = h.confidence(rec.params["weighting"])
    ids, _ = model.recommend(rows, conf[rows], N=k, filter_already_liked_items=False)
    return np.where(ids >= 0, ids, -1).astype(np.int64)


def item_knn_recs(rec: Recommender, members: pd.Index, k: int) -> np.ndarray:
    from implicit.nearest_neighbours import CosineRecommender

    h = rec.history
    assert h is not None
    knn = CosineRecommender(K=100, num_threads=rec.settings.recommend.num_threads)
    knn.fit(h.confidence(rec.params["weighting"]), show_progress=False)
    return _als_like_recs(knn, rec, members, k)


def als_recs(rec: Recommender, members: pd.Index, k: int) -> np.ndarray:
    return _als_like_recs(rec.als, rec, members, k)


RECS = {"model": model_recs, "popularity": popularity_recs, "own_history": own_history_recs,
        "item_knn": item_knn_recs, "als": als_recs}


def evaluate(rec: Recommender, split: Split, k: int, methods: tuple[str, ...] = METHODS) -> dict[str, dict]:
    """Metrics of each method on ``split`` (``rec`` fitted on ``split.train``), the model first."""
    out = {}
    for name in methods:
        t = time.perf_counter()
        out[name] = topk_metrics(RECS[name](rec, split.members, k), split, rec.items, k)
        out[name]["seconds"] = time.perf_counter() - t
    return out


# --- tuning ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecTuning:
    best_params: dict[str, Any]
    best: float
    default: float
    trials: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


def suggest(trial: Any) -> dict[str, Any]:
    return {"factors": trial.suggest_int("factors", 16, 128, log=True),
            "regularization": trial.suggest_float("regularization", 1e-3, 1.0, log=True),
            "alpha": trial.suggest_float("alpha", 0.5, 40.0, log=True),
            "iterations": trial.suggest_int("iterations", 5, 25),
            "weighting": trial.suggest_categorical("weighting", ["bm25", "log"]),
            "half_life_days": trial.suggest_float("half_life_days", 14.0, 720.0, log=True),
            "blend": trial.suggest_float("blend", 0.0, 1.0),
            "due_from": trial.suggest_float("due_from", 0.0, 1.5),
            "due_power": trial.suggest_float("due_power", 0.0, 2.0),
            "repeat_share": trial.suggest_float("repeat_share", 0.0, 0.5)}


def tune(settings: Settings, lines: pd.DataFrame, items: pd.DataFrame | None, members: pd.DataFrame | None,
         cutoff: date | str | pd.Timestamp, k: int = 10, log_to_mlflow: bool = True) -> RecTuning:
    """optuna (TPE, seeded) on the validation split before ``cutoff``: at most
    ``settings.recommend.trials`` trials, none started after ``timeout_s``; the settings' parameters are
    trial 0, so the result is never worse than them there. Each trial is a nested MLflow run."""
    import optuna

    rs = settings.recommend
    if rs.trials == 0:
        return RecTuning({}, math.nan, math.nan, 0, 0.0)
    started = time.perf_counter()
    before = lines[lines[C.TS] < _utc(cutoff)]
    span = int((_utc(cutoff) - purchase_lines(before)[C.TS].min()) / DAY)
    window = max(1, min(rs.horizon_days, span // 2))  # a short history keeps half of it to learn from
    split = time_split(before, _utc(cutoff) - window * DAY, window, data_end=purchase_lines(lines)[C.TS].max())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=7))
    base = settings_params(settings)
    # trial 0 runs the settings as they are; trials 1-2 are corners a few TPE trials rarely reach: every
    # bought item due again (own history first), and ALS first
    study.enqueue_trial(base)
    study.enqueue_trial({**base, "due_from": 0.0, "due_power": 0.0, "repeat_share": 0.0, "blend": 0.95,
                         "half_life_days": 720.0})
    study.enqueue_trial({**base, "blend": 0.2})
    history: list[dict[str, Any]] = []

    def objective(trial: optuna.Trial) -> float:
        params = {} if trial.number == 0 else suggest(trial)
        t0 = time.perf_counter()
        rec = Recommender(settings, **params).fit(split.train, items, members, cutoff=split.cutoff)
        score = topk_metrics(model_recs(rec, split.members, k), split, rec.items, k)[f"recall@{k}"]
        record = {"trial": trial.number, f"recall@{k}": score, "seconds": time.perf_counter() - t0, **params}
        history.append(record)
        if log_to_mlflow:
            log_trial(trial.number, params, {f"valid_recall_at_{k}": score, "seconds": record["seconds"]},
                      prefix="als")
        log.info("recommender trial %d: recall@%d %.4f (%s)", trial.number, k, score, params or "settings")
        return score

    study.optimize(objective, n_trials=rs.trials, timeout=rs.timeout_s, gc_after_trial=True)
    best = study.best_trial
    params = {} if best.number == 0 else suggest(optuna.trial.FixedTrial(best.params))
    return RecTuning(params, float(best.value), float(history[0][f"recall@{k}"]), len(study.trials),
                     time.perf_counter() - started, history)


def settings_params(settings: Settings) -> dict[str, Any]:
    return {p: getattr(settings.recommend, p) for p in PARAMS}


__all__ = ["METHODS", "RECS", "History", "Split", "evaluate", "time_split", "topk_metrics", "tune"]

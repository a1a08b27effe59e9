"""Who answers a coupon: a two-model (T-learner) uplift ranking, judged by the Qini curve against random
targeting.

The rows are the members of past campaigns (treatment and holdout), with their features at the send (the
serving FeatureService through Feast's point-in-time join at ``sent_at``) and whether they repurchased in
the window (training.campaigns' definition). One LightGBM classifier learns P(repurchase | features) on the
treated, another on the held out; the uplift of a member is the difference. Scores are cross-fitted
(``folds``, split by member), so every member is ranked by models that never saw them.

Qini (Radcliffe): rank by predicted uplift, and for the top ``k`` rows
``Q(k) = R_t(k) - R_h(k) * N_t(k) / N_h(k)`` (responders in each arm, the holdout scaled to the treated
count). Random targeting gives the straight line from 0 to ``Q(n)``; the Qini coefficient is the mean gap
between the curve and that line, divided by n (0 for random on average). ``uplift@k``: the rate difference
between the arms among the top share ``k``.

Example::

    report = evaluate_uplift(frame, features, folds=5)
    report["qini"], report["random_qini_p95"], report["uplift_at"]["0.2"]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from training.campaigns import TREATMENT

# small models: the uplift is the difference of two noisy fits, and the holdout arm is a fifth of the rows
# (on the 20k demo, 50 rounds with 100 rows a leaf ranked best of the few tried: benchmarks/campaigns.py)
_PARAMS = {"objective": "binary", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 100,
           "feature_fraction": 0.9, "lambda_l2": 1.0, "verbose": -1, "deterministic": True, "num_threads": 1}


def qini_curve(score: np.ndarray, treated: np.ndarray, outcome: np.ndarray) -> np.ndarray:
    """Q(k) for k = 0..n rows taken best score first (ties in the given order)."""
    order = np.argsort(-np.asarray(score, dtype=float), kind="stable")
    t = np.asarray(treated, dtype=bool)[order]
    y = np.asarray(outcome, dtype=float)[order]
    n_t, n_h = np.cumsum(t), np.cumsum(~t)
    r_t, r_h = np.cumsum(y * t), np.cumsum(y * ~t)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = r_t - np.where(n_h > 0, r_h * n_t / n_h, 0.0)
    return np.concatenate([[0.0], q])


def qini_coefficient(score: np.ndarray, treated: np.ndarray, outcome: np.ndarray) -> float:
    """Mean gap between the Qini curve and random targeting's straight line, over n (0 for random)."""
    q = qini_curve(score, treated, outcome)
    n = len(q) - 1
    line = q[-1] * np.arange(n + 1) / max(n, 1)
    return float((q - line).mean() / max(n, 1))


def uplift_at(score: np.ndarray, treated: np.ndarray, outcome: np.ndarray, share: float) -> float:
    """rate(treated) - rate(held out) among the top ``share`` of rows by score (NaN if an arm is empty)."""
    order = np.argsort(-np.asarray(score, dtype=float), kind="stable")[: max(1, round(share * len(score)))]
    t = np.asarray(treated, dtype=bool)[order]
    y = np.asarray(outcome, dtype=float)[order]
    if t.all() or not t.any():
        return float("nan")
    return float(y[t].mean() - y[~t].mean())


class TLearner:
    """Two LightGBM classifiers, one per arm; :meth:`predict` is P(treated answer) - P(held-out answer)."""

    def __init__(self, rounds: int = 50, seed: int = 7) -> None:
        self.rounds, self.seed = rounds, seed
        self.models: dict[bool, Any] = {}

    def fit(self, x: pd.DataFrame, treated: np.ndarray, outcome: np.ndarray) -> TLearner:
        import lightgbm as lgb

        treated = np.asarray(treated, dtype=bool)
        for arm in (True, False):
            rows = treated == arm
            if rows.sum() < 20 or len(np.unique(outcome[rows])) < 2:
                raise ValueError(f"the {'treatment' if arm else 'holdout'} arm has {int(rows.sum())} rows and "
                                 "needs at least 20 with both outcomes to fit an uplift model")
            data = lgb.Dataset(x[rows], label=np.asarray(outcome, dtype=float)[rows], free_raw_data=False)
            self.models[arm] = lgb.train({**_PARAMS, "seed": self.seed}, data, num_boost_round=self.rounds)
        return self

    def predict(self, x: pd.DataFrame) -> np.ndarray:
        return self.models[True].predict(x) - self.models[False].predict(x)


def _matrix(features: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    out = features[list(columns)].copy()
    for c in out.columns:
        if out[c].dtype == object or str(out[c].dtype) in ("string", "str"):
            out[c] = out[c].astype("category")
        elif str(out[c].dtype) == "boolean":
            out[c] = out[c].astype("float64")
    return out


def evaluate_uplift(frame: pd.DataFrame, feature_columns: Sequence[str], outcome: str = "repurchased",
                    folds: int = 5, seed: int = 7, shares: Sequence[float] = (0.1, 0.2, 0.3),
                    permutations: int = 200, rounds: int = 50) -> dict[str, Any]:
    """Cross-fitted T-learner uplift of ``frame`` (one row per campaign member: ``arm``, ``outcome`` and the
    features), its Qini coefficient beside random targeting's (the same rows ranked at random
    ``permutations`` times: mean and 95th percentile), and uplift@share for the model and overall."""
    from features.contract import C

    treated = (frame[C.ARM] == TREATMENT).to_numpy()
    y = frame[outcome].to_numpy(dtype=float)
    x = _matrix(frame, feature_columns)
    rng = np.random.default_rng(seed)
    members = frame[C.MEMBER_ID].astype(str).to_numpy()
    uniq = np.unique(members)
    fold_of = dict(zip(uniq, rng.permutation(len(uniq)) % folds, strict=True))
    fold = np.array([fold_of[m] for m in members])
    score = np.empty(len(frame))
    for f in range(folds):
        test = fold == f
        model = TLearner(rounds=rounds, seed=seed).fit(x[~test], treated[~test], y[~test])
        score[test] = model.predict(x[test])
    qini = qini_coefficient(score, treated, y)
    rand = np.array([qini_coefficient(rng.permutation(len(y)).astype(float), treated, y)
                     for _ in range(permutations)])
    overall = float(y[treated].mean() - y[~treated].mean())
    return {"rows": len(frame), "treated": int(treated.sum()), "held_out": int((~treated).sum()), "folds": folds,
            "qini": qini, "random_qini_mean": float(rand.mean()), "random_qini_p95": float(np.quantile(rand, 0.95)),
            "beats_random": bool(qini > np.quantile(rand, 0.95)), "overall_uplift": overall,
            "uplift_at": {str(s): uplift_at(score, treated, y, s) for s in shares}, "score": score}


def uplift_frame(settings: Any, log: pd.DataFrame, lines: pd.DataFrame, window_days: int,
                 tolerance: float = 0.05) -> tuple[pd.DataFrame, list[str]]:
    """(one row per campaign member: the log's columns, the serving features at ``sent_at`` through Feast's
    point-in-time join, ``repurchased`` within ``window_days``; the feature columns)."""
    from features.contract import C
    from features.definitions import SERVING_SERVICE, view_schema
    from features.lake import MEMBER_VIEW
    from features.store import training_frame
    from training.campaigns import check_log, window_outcomes

    log = check_log(log).reset_index(drop=True)
    lines = lines.assign(**{C.TS: pd.to_datetime(lines[C.TS], utc=True),
                            C.MEMBER_ID: lines[C.MEMBER_ID].astype(str)})
    outcome = window_outcomes(log, lines, window_days, tolerance)
    entity = pd.DataFrame({C.MEMBER_ID: log[C.MEMBER_ID], C.EVENT_TIMESTAMP: log[C.SENT_AT]})
    features = training_frame(settings, entity, SERVING_SERVICE).drop(columns=[C.MEMBER_ID, C.EVENT_TIMESTAMP])
    columns = list(view_schema(settings, MEMBER_VIEW))
    frame = pd.concat([log, features.reset_index(drop=True), outcome[["repurchased"]]], axis=1)
    return frame, columns

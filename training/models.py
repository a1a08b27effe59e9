"""The churn model: LightGBM on a FeatureService's features, calibrated, with bands and plain-word reasons.

Fitted state (feature order, categories, calibration, bands, a fingerprint of the settings that define the
label and the features, library versions) travels inside the saved file and is checked on load.

Example::

    from training.dataset import build_training_set
    from training.models import ChurnModel
    frame = build_training_set(settings, cutoffs, "churn_v1")
    cut = frame["event_timestamp"]
    train, valid = frame[cut < cut.max()], frame[cut == cut.max()]   # a later time fold, never random
    model = ChurnModel(settings=settings).fit(train, valid)
    p = model.predict_proba(frame)           # calibrated P(no purchase in the next H days)
    model.band(p)                            # array of 'low' / 'medium' / 'high'
    model.reasons(frame.head(3))             # [['no purchase for 64 days, 2.1 times their usual gap', ...]]
    model.save(path); ChurnModel.load(path, settings=settings)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from features.contract import C, F
from features.lake import atomic_path
from features.settings import Settings
from training.labels import L

log = logging.getLogger(__name__)

FORMAT = 1
MONOTONE_UP = (F.RECENCY_DAYS, F.RECENCY_GAP_RATIO)
"""Features whose increase never lowers churn risk (a longer silence, relative or absolute)."""
DEFAULT_BANDS: tuple[tuple[str, float], ...] = (("low", 0.0), ("medium", 0.3), ("high", 0.6))
_NON_FEATURES = {C.MEMBER_ID, C.EVENT_TIMESTAMP, L.CUTOFF, L.CHURN, L.LABEL_OBSERVABLE, L.ORDERS_NEXT_H,
                 L.DAYS_TO_NEXT, L.NEXT_EVENT, L.SPEND_NEXT, L.SPEND_OBSERVABLE}
_P_EPS = 1e-4


class ModelLoadError(ValueError):
    """A saved model that does not match what it is loaded into; the message names what differs."""


def settings_fingerprint(settings: Settings) -> str:
    """A hash of the settings that define the churn label and the features (lifecycle, RFM, windows)."""
    parts = {"lifecycle": settings.lifecycle.model_dump(mode="json"),
             "rfm": settings.rfm.model_dump(mode="json"),
             "features": settings.features.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    """Versions of the libraries a saved model's predictions depend on."""
    import lightgbm

    return {"lightgbm": lightgbm.__version__, "numpy": np.__version__, "pandas": pd.__version__}


def _isotonic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pool-adjacent-violators: knots (x, y) of the non-decreasing least-squares fit of y on x."""
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    ux, start = np.unique(xs, return_index=True)
    sums = np.add.reduceat(ys, start)
    counts = np.diff(np.append(start, len(xs))).astype(float)
    vals: list[float] = []
    wts: list[float] = []
    lefts: list[int] = []
    for i in range(len(ux)):
        vals.append(sums[i] / counts[i])
        wts.append(counts[i])
        lefts.append(i)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            w = wts[-2] + wts[-1]
            v = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / w
            vals.pop()
            wts.pop()
            lefts.pop()
            vals[-1], wts[-1] = v, w
    block = np.zeros(len(ux), dtype=int)
    block[lefts] = 1
    fitted = np.asarray(vals)[np.cumsum(block) - 1]
    return ux, fitted


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 10 else f"{v:,.1f}"


def _describe(feature: str, value: Any, row: pd.Series) -> str:
    """A feature value in the words a marketer reads."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        if feature in (F.RECENCY_DAYS, F.RECENCY_GAP_RATIO, F.GAP_MEAN_DAYS):
            return "no purchase yet" if feature == F.RECENCY_DAYS else "fewer than two purchases so far"
        return f"{feature.replace('_', ' ')} unknown"
    if feature == F.RECENCY_DAYS:
        return f"no purchase for {value:.0f} days"
    if feature == F.RECENCY_GAP_RATIO:
        rec = row.get(F.RECENCY_DAYS)
        lead = f"no purchase for {rec:.0f} days, " if rec is not None and not pd.isna(rec) else ""
        return f"{lead}{value:.1f} times their usual gap"
    if feature == F.SPEND_TREND_90D:
        return f"spend {'down' if value < 0 else 'up'} {abs(value) * 100:.0f}% on the previous 90 days"
    if feature == F.TENURE_DAYS:
        return f"member for {value:.0f} days"
    if feature == F.ORDERS_TOTAL:
        return f"{value:.0f} orders in total"
    if feature == F.GAP_MEAN_DAYS:
        return f"usually buys every {value:.0f} days"
    if feature == F.GAP_STD_DAYS:
        return f"irregular buyer (gap varies by {value:.0f} days)"
    for w in (7, 14, 30, 60, 90, 180, 365):
        if feature in (F.orders(w), F.spend(w)) and value == 0:
            return f"no {'orders' if feature == F.orders(w) else 'spend'} in the last {w} days"
        if feature == F.orders(w):
            return f"{value:.0f} order{'s' if value != 1 else ''} in the last {w} days"
        if feature == F.spend(w):
            return f"spent {_fmt(value)} in the last {w} days"
    if feature == F.SPEND_PREV_90D:
        return f"spent {_fmt(value)} in the 90 days before the last 90"
    if feature == F.AVG_ORDER_VALUE:
        return f"average order {_fmt(value)}"
    if feature in (F.DISCOUNT_SHARE, F.RETURN_SHARE, F.TOP_CATEGORY_SHARE, F.REPLENISHABLE_SHARE):
        return f"{feature.replace('_', ' ')} {value * 100:.0f}%"
    if feature == F.RFM_SEGMENT:
        return f"RFM segment '{value}'"
    if feature == F.LIFECYCLE_STAGE:
        return f"lifecycle stage '{value}'"
    if isinstance(value, int | float | np.integer | np.floating):
        return f"{feature.replace('_', ' ')} {_fmt(float(value))}"
    return f"{feature.replace('_', ' ')} '{value}'"


class ChurnModel:
    """P(no purchase in the next H days) from LightGBM (binary), isotonic-calibrated on a later time fold.

    ``features`` default to the training frame's ``attrs['features']`` (set by
    :func:`training.dataset.build_training_set`) or every non-key, non-label column. Risk never falls as
    ``recency_days`` or ``recency_gap_ratio`` grows (monotone constraints). See the module docstring.
    """

    def __init__(self, settings: Settings | None = None, service: str = "churn_v1",
                 features: Sequence[str] | None = None, params: dict[str, Any] | None = None,
                 num_boost_round: int = 1000, early_stopping_rounds: int = 50,
                 bands: Sequence[tuple[str, float]] = DEFAULT_BANDS, num_threads: int = 0,
                 seed: int = 7) -> None:
        self.service = service
        self.features: list[str] | None = list(features) if features is not None else None
        self.params: dict[str, Any] = {"objective": "binary", "learning_rate": 0.05, "num_leaves": 15,
                                       "min_data_in_leaf": 20, "feature_fraction": 0.9, "lambda_l2": 1.0,
                                       "verbose": -1, "seed": seed, "deterministic": True,
                                       "num_threads": num_threads, **(params or {})}
        self.num_boost_round = num_boost_round
        self.early_stopping_rounds = early_stopping_rounds
        self.bands = [(str(n), float(t)) for n, t in bands]
        if [t for _, t in self.bands] != sorted(t for _, t in self.bands) or not self.bands:
            raise ValueError(f"bands must be (name, lower threshold) in increasing order, got {self.bands}")
        self.settings_fingerprint = settings_fingerprint(settings) if settings is not None else None
        self.categories: dict[str, list[str]] = {}
        self.calibration: dict[str, list[float]] | None = None
        self.best_iteration: int | None = None
        self.booster: Any = None
        self.versions: dict[str, str] = {}

    # --- fitting ---------------------------------------------------------------------------------------

    def _feature_list(self, frame: pd.DataFrame) -> list[str]:
        if self.features is not None:
            return self.features
        feats = frame.attrs.get("features") or [c for c in frame.columns if c not in _NON_FEATURES]
        return list(feats)

    def _matrix(self, frame: pd.DataFrame) -> pd.DataFrame:
        assert self.features is not None
        missing = [f for f in self.features if f not in frame.columns]
        if missing:
            raise KeyError(f"frame lacks feature column(s) {', '.join(missing)} of {self.service}")
        out = {}
        for f in self.features:
            col = frame[f]
            if f in self.categories:
                out[f] = pd.Categorical(col.astype("string").astype(object).where(col.notna(), None),
                                        categories=self.categories[f])
            else:
                try:
                    out[f] = pd.to_numeric(col, errors="raise").astype(float)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"feature column {f!r} is not numeric ({col.dtype}): {e}") from None
        return pd.DataFrame(out, index=frame.index)

    def _array(self, frame: pd.DataFrame) -> np.ndarray:
        """The features as a float matrix for the raw Booster: categories as their codes in the saved
        category lists (NaN when missing or unseen), which is what LightGBM makes of the pandas categories
        it was trained on, without pandas' per-call overhead (a one-row predict drops from ms to µs)."""
        assert self.features is not None
        missing = [f for f in self.features if f not in frame.columns]
        if missing:
            raise KeyError(f"frame lacks feature column(s) {', '.join(missing)} of {self.service}")
        out = np.empty((len(frame), len(self.features)), dtype=np.float64)
        numeric = [j for j, f in enumerate(self.features) if f not in self.categories]
        try:  # one block copy for the numeric columns: per-column access dominated a one-row predict
            out[:, numeric] = frame[[self.features[j] for j in numeric]].to_numpy(dtype=np.float64,
                                                                                  na_value=np.nan)
        except (TypeError, ValueError):
            for j in numeric:
                col = frame[self.features[j]]
                try:
                    out[:, j] = col.to_numpy(dtype=np.float64, na_value=np.nan)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"feature column {self.features[j]!r} is not numeric ({col.dtype}): "
                                     f"{e}") from None
        for j, f in enumerate(self.features):
            if f in self.categories:
                values = frame[f].to_numpy(dtype=object)
                codes = self._category_index[f].get_indexer(values)
                out[:, j] = np.where(codes < 0, np.nan, codes)
        return out

    @property
    def _category_index(self) -> dict[str, pd.Index]:
        cache = self.__dict__.get("_cat_index")
        if cache is None or cache[0] is not self.categories:
            cache = (self.categories, {f: pd.Index(v, dtype=object) for f, v in self.categories.items()})
            self.__dict__["_cat_index"] = cache
        return cache[1]

    @staticmethod
    def _labels(frame: pd.DataFrame, what: str) -> np.ndarray:
        if L.CHURN not in frame.columns:
            raise KeyError(f"{what} frame lacks the label column {L.CHURN!r}")
        y = frame[L.CHURN]
        if y.isna().any():
            row = int(np.flatnonzero(y.isna().to_numpy())[0])
            raise ValueError(f"{what} frame: row {row}, column {L.CHURN!r} is missing (label not observable)")
        return y.to_numpy(dtype=float)

    def fit(self, train_frame: pd.DataFrame, valid_frame: pd.DataFrame) -> ChurnModel:
        """Fit on ``train_frame``; stop early and calibrate on ``valid_frame``, which must be later."""
        import lightgbm as lgb

        if len(train_frame) == 0 or len(valid_frame) == 0:
            raise ValueError("fit needs rows in both the training and the validation frame")
        if C.EVENT_TIMESTAMP in train_frame and C.EVENT_TIMESTAMP in valid_frame:
            t_max, v_min = train_frame[C.EVENT_TIMESTAMP].max(), valid_frame[C.EVENT_TIMESTAMP].min()
            if v_min <= t_max:
                raise ValueError(f"the validation fold must be later than the training fold: it starts at "
                                 f"{v_min}, training runs to {t_max} (no random or overlapping splits)")
        self.features = self._feature_list(train_frame)
        self.categories = {}
        for f in self.features:
            col = train_frame[f]
            if not (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)):
                self.categories[f] = sorted(col.dropna().astype(str).unique().tolist())
        x_tr, x_va = self._matrix(train_frame), self._matrix(valid_frame)
        y_tr, y_va = self._labels(train_frame, "training"), self._labels(valid_frame, "validation")
        params = dict(self.params)
        params["monotone_constraints"] = [1 if f in MONOTONE_UP else 0 for f in self.features]
        params["monotone_constraints_method"] = "intermediate"
        d_tr = lgb.Dataset(x_tr, y_tr, categorical_feature=list(self.categories) or "auto",
                           free_raw_data=False)
        d_va = lgb.Dataset(x_va, y_va, reference=d_tr)
        self.booster = lgb.train(params, d_tr, num_boost_round=self.num_boost_round, valid_sets=[d_va],
                                 valid_names=["valid"],
                                 callbacks=[lgb.early_stopping(self.early_stopping_rounds, verbose=False)])
        self.best_iteration = int(self.booster.best_iteration or self.booster.current_iteration())
        raw = self._raw(self._array(valid_frame))
        knots_x, knots_y = _isotonic(raw, y_va)
        self.calibration = {"x": knots_x.tolist(), "y": knots_y.tolist()}
        self.versions = library_versions()
        log.info("churn model: %d features, %d rounds (best %d), trained on %d rows, calibrated on %d",
                 len(self.features), self.booster.current_iteration(), self.best_iteration, len(x_tr),
                 len(x_va))
        return self

    # --- prediction ------------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if self.booster is None or self.features is None or self.calibration is None:
            raise RuntimeError("ChurnModel is not fitted; call fit() or load()")

    def _raw(self, x: np.ndarray) -> np.ndarray:
        raw = self.booster.predict(x, num_iteration=self.best_iteration, num_threads=1)
        return np.asarray(raw, dtype=float)

    def predict_raw(self, frame: pd.DataFrame) -> np.ndarray:
        """Uncalibrated LightGBM probabilities (one thread, raw Booster)."""
        self._check_fitted()
        return self._raw(self._array(frame))

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """Calibrated churn probabilities, one per row of ``frame``."""
        self._check_fitted()
        assert self.calibration is not None
        raw = self._raw(self._array(frame))
        p = np.interp(raw, self.calibration["x"], self.calibration["y"])
        return np.clip(p, _P_EPS, 1 - _P_EPS)

    def band(self, p: Any) -> np.ndarray:
        """Band name of each probability: the last band whose lower threshold is <= p."""
        q = np.atleast_1d(np.asarray(p, dtype=float))
        names = np.array([n for n, _ in self.bands], dtype=object)
        lows = np.array([t for _, t in self.bands])
        idx = np.clip(np.searchsorted(lows, q, side="right") - 1, 0, len(lows) - 1)
        return names[idx]

    def reasons(self, frame: pd.DataFrame, top: int = 3) -> list[list[str]]:
        """Per row, up to ``top`` plain-word reasons: the features that push this member's risk up most
        (LightGBM SHAP contributions, ``pred_contrib``), described with their values."""
        self._check_fitted()
        assert self.features is not None
        x = self._array(frame)
        contrib = np.asarray(self.booster.predict(x, num_iteration=self.best_iteration, pred_contrib=True,
                                                  num_threads=1))[:, : len(self.features)]
        out: list[list[str]] = []
        for i in range(len(frame)):
            row = frame.iloc[i]
            order = np.argsort(-contrib[i], kind="stable")
            picked: list[str] = []
            for j in order:
                if contrib[i, j] <= 0 or len(picked) >= top:
                    break
                f = self.features[j]
                # the gap ratio's words already name the recency
                if f == F.RECENCY_DAYS and any("usual gap" in r for r in picked):
                    continue
                text = _describe(f, row[f], row)
                if f == F.RECENCY_GAP_RATIO:
                    picked = [r for r in picked if not r.startswith("no purchase for")]
                if text not in picked:
                    picked.append(text)
            out.append(picked[:top])
        return out

    # --- persistence -----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {"format": FORMAT, "kind": "churn", "service": self.service, "features": self.features,
                "categories": self.categories, "calibration": self.calibration, "bands": self.bands,
                "params": self.params, "best_iteration": self.best_iteration,
                "settings_fingerprint": self.settings_fingerprint, "versions": self.versions,
                "booster": self.booster.model_to_string()}

    def save(self, path: str | Path) -> Path:
        """Write the model (one JSON file) atomically."""
        target = Path(path)
        with atomic_path(target) as tmp:
            tmp.write_text(json.dumps(self.to_dict()), encoding="utf-8")
        log.info("saved churn model to %s", target)
        return target

    @classmethod
    def load(cls, path: str | Path, settings: Settings | None = None,
             check_versions: bool = True) -> ChurnModel:
        """Read a saved model, checking its feature order against the booster, its settings fingerprint
        against ``settings`` (when given) and its library versions against the installed ones."""
        import lightgbm as lgb

        path = Path(path)
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"cannot read churn model {path}: {e}") from None
        if state.get("format") != FORMAT or state.get("kind") != "churn":
            raise ModelLoadError(f"{path} is not a churn model of format {FORMAT} (format "
                                 f"{state.get('format')!r}, kind {state.get('kind')!r})")
        booster = lgb.Booster(model_str=state["booster"])
        features = list(state["features"])
        if booster.feature_name() != features:
            diff = next(i for i, (a, b) in enumerate(zip(booster.feature_name(), features, strict=False))
                        if a != b) if len(booster.feature_name()) == len(features) else None
            raise ModelLoadError(f"{path}: feature order differs from the booster's"
                                 + (f" at position {diff}: saved {features[diff]!r}, booster "
                                    f"{booster.feature_name()[diff]!r}" if diff is not None else
                                    f": {len(features)} saved, {len(booster.feature_name())} in the booster"))
        unknown = [f for f in state["categories"] if f not in features]
        if unknown:
            raise ModelLoadError(f"{path}: categories for unknown feature(s) {', '.join(unknown)}")
        if settings is not None:
            want = settings_fingerprint(settings)
            if state["settings_fingerprint"] not in (None, want):
                raise ModelLoadError(f"{path}: settings fingerprint differs: the model was trained with "
                                     f"{state['settings_fingerprint']}, these settings give {want} "
                                     "(lifecycle, RFM or feature windows changed)")
        if check_versions:
            have = library_versions()
            diffs = [f"{k} {v} (saved) vs {have.get(k)} (installed)" for k, v in state["versions"].items()
                     if have.get(k) != v]
            if diffs:
                raise ModelLoadError(f"{path}: library versions differ: {'; '.join(diffs)}")
        model = cls(service=state["service"], features=features, params=state["params"],
                    bands=[tuple(b) for b in state["bands"]])
        model.settings_fingerprint = state["settings_fingerprint"]
        model.categories = {k: list(v) for k, v in state["categories"].items()}
        model.calibration = state["calibration"]
        model.best_iteration = state["best_iteration"]
        model.versions = dict(state["versions"])
        model.booster = booster
        return model

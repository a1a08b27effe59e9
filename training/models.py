"""LightGBM models on a FeatureService's features: churn, value and (in :mod:`training.next_purchase`) next
purchase, sharing one base class, :class:`LgbModel`.

What every model shares: features in the training frame's order (``frame.attrs['features']``), categories
learned on the training frame, predictions from the raw Booster on a float matrix with one thread, a
validation fold that must be later than the training fold, a deterministic sample of at most
``settings.training.max_train_rows`` training rows, and one JSON file holding the fitted state (feature
order, categories, parameters, a fingerprint of the settings that define the label and the features,
library versions, the booster), checked on load. :func:`load_model` reads any kind.

Example::

    from training.dataset import build_training_set
    from training.models import ChurnModel, load_model
    frame = build_training_set(settings, cutoffs, "churn_v1")
    cut = frame["event_timestamp"]
    train, valid = frame[cut < cut.max()], frame[cut == cut.max()]   # a later time fold, never random
    model = ChurnModel(settings=settings).fit(train, valid)
    p = model.predict_proba(frame)           # calibrated P(no purchase in the next H days)
    model.band(p)                            # array of 'low' / 'medium' / 'high'
    model.reasons(frame.head(3))             # [['no purchase for 64 days, 2.1 times their usual gap', ...]]
    model.feature_importance().head()        # gain per feature, largest first
    model.save(path); ChurnModel.load(path, settings=settings); load_model(path)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

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
                 L.DAYS_TO_NEXT, L.NEXT_EVENT, L.SPEND_NEXT, L.SPEND_OBSERVABLE, L.CAT_DAYS_TO_NEXT,
                 L.CAT_NEXT_EVENT}
_P_EPS = 1e-4
DEFAULT_MAX_TREES = 300
_BASE_PARAMS: dict[str, Any] = {"learning_rate": 0.1, "num_leaves": 15, "min_data_in_leaf": 50,
                                "feature_fraction": 0.9, "lambda_l2": 1.0, "verbose": -1, "deterministic": True}


class ModelLoadError(ValueError):
    """A saved model that does not match what it is loaded into; the message names what differs."""


def settings_fingerprint(settings: Settings, extra: dict[str, Any] | None = None) -> str:
    """A hash of the settings that define the labels and the features (lifecycle, RFM, windows), plus
    ``extra`` (what else defines one model's label, e.g. the value model's spend window)."""
    parts: dict[str, Any] = {"lifecycle": settings.lifecycle.model_dump(mode="json"),
                             "rfm": settings.rfm.model_dump(mode="json"),
                             # what computes the features (DuckDB or Spark) does not change them
                             "features": settings.features.model_dump(mode="json", exclude={"engine"})}
    if extra:
        parts["extra"] = extra
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    """Versions of the libraries a saved model's predictions depend on."""
    import lightgbm

    return {"lightgbm": lightgbm.__version__, "numpy": np.__version__, "pandas": pd.__version__}


def sample_by_member(frame: pd.DataFrame, max_rows: int) -> pd.DataFrame:
    """At most ``max_rows`` rows of ``frame``, chosen by a hash of ``member_id``: the same members whatever
    the row order or the run, and every cutoff of a kept member together (the one member at the boundary
    may be cut). Row order is kept. A frame within the bound comes back as it is."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    if len(frame) <= max_rows:
        return frame
    if C.MEMBER_ID not in frame.columns:
        raise KeyError(f"cannot sample {len(frame)} rows down to {max_rows}: no {C.MEMBER_ID!r} column")
    ids = frame[C.MEMBER_ID].astype(str).to_numpy(dtype=object)
    h = pd.util.hash_array(ids, categorize=True)  # fixed hash key: stable across runs and machines
    order = np.lexsort((np.arange(len(frame)), h))
    keep = np.sort(order[:max_rows])
    return frame.iloc[keep]


def nonnegative_column(frame: pd.DataFrame, column: str, what: str, meaning: str) -> np.ndarray:
    """``frame[column]`` as float64, or a ValueError naming the first row that is missing, infinite or
    negative (``meaning`` says what the column holds, for the message)."""
    y = frame[column].to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(y) | (y < 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{what} frame: row {row}, column {column!r} is {y[row]} ({meaning} must be a number "
                         ">= 0)")
    return y


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


Frame = pd.DataFrame | Mapping[str, np.ndarray]
"""What the models predict from: a pandas frame, or column name -> numpy array (``online_columns``)."""


def n_rows(frame: Frame) -> int:
    """Rows of a :data:`Frame`."""
    if isinstance(frame, pd.DataFrame):
        return len(frame)
    return len(next(iter(frame.values()))) if len(frame) else 0


def column_names(frame: Frame) -> Any:
    """The column names of a :data:`Frame` (for ``in`` tests)."""
    return frame.columns if isinstance(frame, pd.DataFrame) else frame


def objects(frame: Frame, column: str) -> np.ndarray:
    """One column of a :data:`Frame` as an object array (values as stored, missing as None/NaN/NA)."""
    col = frame[column]
    return col.to_numpy(dtype=object) if isinstance(col, pd.Series) else np.asarray(col, dtype=object)


def floats(frame: Frame, column: str) -> np.ndarray:
    """One column of a :data:`Frame` as float64, missing as NaN."""
    col = frame[column]
    if isinstance(col, pd.Series):
        return col.to_numpy(dtype=np.float64, na_value=np.nan)
    return np.asarray(col, dtype=np.float64)


def take_rows(frame: Frame, rows: np.ndarray) -> Frame:
    """The rows ``rows`` (positions) of a :data:`Frame`, as the same kind of frame."""
    if isinstance(frame, pd.DataFrame):
        return frame.iloc[rows]
    return {c: np.asarray(v)[rows] for c, v in frame.items()}


def _code(codes: dict[str, int], value: Any) -> float:
    """The category code of ``value`` (looked up as text, as the categories are learned), NaN if missing or
    unseen: what ``_array``'s index lookup answers, for one value."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    code = codes.get(value) if isinstance(value, str) else codes.get(str(value))
    return math.nan if code is None else float(code)


def _describe(feature: str, value: Any, row: Mapping[str, Any]) -> str:
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




class LgbModel:
    """What every LightGBM model here shares; subclasses set ``kind`` and define ``fit`` and predictions.

    ``features`` default to the training frame's ``attrs['features']`` (set by
    :func:`training.dataset.build_training_set`) or every non-key, non-label column; non-numeric columns
    become LightGBM categories (values unseen in training predict as missing). ``num_threads`` is for
    training (default ``settings.training.num_threads``, else 0 = all cores); predictions always use one
    thread and the raw Booster. With ``settings``, training frames are sampled down to
    ``settings.training.max_train_rows`` rows by member (:func:`sample_by_member`).

    Subclasses add their own state through ``_state`` / ``_restore`` and extra booster columns through
    ``_model_features``.
    """

    kind: ClassVar[str] = ""
    default_service: ClassVar[str] = ""
    objective: ClassVar[dict[str, Any]] = {}
    _kinds: ClassVar[dict[str, type[LgbModel]]] = {}
    _fingerprint_covers: ClassVar[str] = "lifecycle, RFM or feature windows changed"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            LgbModel._kinds[cls.kind] = cls

    def __init__(self, settings: Settings | None = None, service: str | None = None,
                 features: Sequence[str] | None = None, params: dict[str, Any] | None = None,
                 num_boost_round: int | None = None, early_stopping_rounds: int = 30,
                 num_threads: int | None = None, seed: int = 7) -> None:
        if num_threads is None:
            num_threads = settings.training.num_threads if settings is not None else 0
        if num_boost_round is None:  # trees cost scoring time linearly: bounded by settings
            num_boost_round = settings.training.max_trees if settings is not None else DEFAULT_MAX_TREES
        self.service = service or self.default_service
        self.features: list[str] | None = list(features) if features is not None else None
        self.params: dict[str, Any] = {**self.objective, **_BASE_PARAMS, "seed": seed,
                                       "num_threads": num_threads, **(params or {})}
        self.num_boost_round = num_boost_round
        self.early_stopping_rounds = early_stopping_rounds
        self.settings_fingerprint = self.fingerprint(settings) if settings is not None else None
        self.max_train_rows: int | None = settings.training.max_train_rows if settings is not None else None
        self.categories: dict[str, list[str]] = {}
        self.best_iteration: int | None = None
        self.booster: Any = None
        self.versions: dict[str, str] = {}
        self.train_rows: int | None = None  # entity rows the last fit used (after sampling)

    @classmethod
    def fingerprint(cls, settings: Settings) -> str:
        """The settings fingerprint this kind of model is saved with and checked against on load."""
        return settings_fingerprint(settings)

    # --- fitting ---------------------------------------------------------------------------------------

    def _feature_list(self, frame: pd.DataFrame) -> list[str]:
        if self.features is not None:
            return self.features
        feats = frame.attrs.get("features") or [c for c in frame.columns if c not in _NON_FEATURES]
        return list(feats)

    def _prepare_fit(self, train_frame: pd.DataFrame, valid_frame: pd.DataFrame,
                     categorical: Sequence[str] = ()) -> pd.DataFrame:
        """Check the folds, sample the training frame, fix the features and learn the categories; returns
        the (sampled) training frame."""
        if len(train_frame) == 0 or len(valid_frame) == 0:
            raise ValueError("fit needs rows in both the training and the validation frame")
        if C.EVENT_TIMESTAMP in train_frame and C.EVENT_TIMESTAMP in valid_frame:
            t_max, v_min = train_frame[C.EVENT_TIMESTAMP].max(), valid_frame[C.EVENT_TIMESTAMP].min()
            if v_min <= t_max:
                raise ValueError(f"the validation fold must be later than the training fold: it starts at "
                                 f"{v_min}, training runs to {t_max} (no random or overlapping splits)")
        features = self._feature_list(train_frame)
        if self.max_train_rows is not None and len(train_frame) > self.max_train_rows:
            n = len(train_frame)
            train_frame = sample_by_member(train_frame, self.max_train_rows)
            log.info("%s model: sampled %d of %d training rows by member (settings.training.max_train_rows)",
                     self.kind, len(train_frame), n)
        missing = [f for f in features if f not in train_frame.columns]
        if missing:
            raise KeyError(f"training frame lacks feature column(s) {', '.join(missing)} of {self.service}")
        self.features = features
        self.categories = {}
        for f in self.features:
            col = train_frame[f]
            if f in categorical or not (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)):
                self.categories[f] = sorted(col.dropna().astype(str).unique().tolist())
        self.train_rows = len(train_frame)
        return train_frame

    def _train(self, params: dict[str, Any], d_tr: Any, d_va: Any) -> None:
        import lightgbm as lgb

        self.booster = lgb.train(params, d_tr, num_boost_round=self.num_boost_round, valid_sets=[d_va],
                                 valid_names=["valid"],
                                 callbacks=[lgb.early_stopping(self.early_stopping_rounds, verbose=False)])
        self.best_iteration = int(self.booster.best_iteration or self.booster.current_iteration())
        self.versions = library_versions()

    def _model_features(self) -> list[str]:
        """The booster's columns, in order: the features (subclasses may append derived columns)."""
        assert self.features is not None
        return list(self.features)

    # --- the feature matrix ----------------------------------------------------------------------------

    def _check_columns(self, frame: Frame) -> None:
        assert self.features is not None
        have = column_names(frame)
        missing = [f for f in self.features if f not in have]
        if missing:
            raise KeyError(f"frame lacks feature column(s) {', '.join(missing)} of {self.service}")

    def _matrix(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The features as a pandas frame (categories as pandas categoricals), as LightGBM trains on it."""
        self._check_columns(frame)
        assert self.features is not None
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

    def _array(self, frame: Frame) -> np.ndarray:
        """The features as a float matrix for the raw Booster: categories as their codes in the saved
        category lists (NaN when missing or unseen), which is what LightGBM makes of the pandas categories
        it was trained on, without pandas' per-call overhead (a one-row predict drops from ms to µs).
        ``frame``: a pandas frame, or a mapping of column name to numpy array (the API's one-row path)."""
        self._check_columns(frame)
        assert self.features is not None
        out = np.empty((n_rows(frame), len(self.features)), dtype=np.float64)
        numeric = [j for j, f in enumerate(self.features) if f not in self.categories]
        if not isinstance(frame, pd.DataFrame):
            for j in numeric:
                try:
                    out[:, j] = np.asarray(frame[self.features[j]], dtype=np.float64)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"feature column {self.features[j]!r} is not numeric: {e}") from None
        else:
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
                values = objects(frame, f)
                if len(values) <= 64:  # a dict per value beats building an index for a few rows
                    codes = self._category_codes[f]
                    out[:, j] = [_code(codes, v) for v in values]
                    continue
                index = self._category_index[f]
                codes = index.get_indexer(values)
                miss = np.flatnonzero(codes < 0)
                if len(miss):  # categories are learned as text: look non-text values (True, 3) up as text
                    miss = miss[~pd.isna(values[miss])]
                    codes[miss] = index.get_indexer(pd.Index([str(v) for v in values[miss]], dtype=object))
                out[:, j] = np.where(codes < 0, np.nan, codes)
        return out

    @property
    def _category_codes(self) -> dict[str, dict[str, int]]:
        cache = self.__dict__.get("_cat_codes")
        if cache is None or cache[0] is not self.categories:
            cache = (self.categories, {f: {str(c): k for k, c in enumerate(v)} for f, v in self.categories.items()})
            self.__dict__["_cat_codes"] = cache
        return cache[1]

    @property
    def _category_index(self) -> dict[str, pd.Index]:
        cache = self.__dict__.get("_cat_index")
        if cache is None or cache[0] is not self.categories:
            cache = (self.categories, {f: pd.Index(v, dtype=object) for f, v in self.categories.items()})
            self.__dict__["_cat_index"] = cache
        return cache[1]

    # --- prediction ------------------------------------------------------------------------------------

    def _is_fitted(self) -> bool:
        return self.booster is not None and self.features is not None

    def _check_fitted(self) -> None:
        if not self._is_fitted():
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit() or load()")

    def _raw(self, x: np.ndarray) -> np.ndarray:
        raw = self.booster.predict(x, num_iteration=self.best_iteration, num_threads=1)
        return np.asarray(raw, dtype=float)

    def feature_importance(self) -> pd.Series:
        """Total gain of each booster column up to the best iteration, largest first."""
        self._check_fitted()
        gain = self.booster.feature_importance(importance_type="gain", iteration=self.best_iteration)
        out = pd.Series(np.asarray(gain, dtype=float), index=pd.Index(self.booster.feature_name(), name="feature"),
                        name="gain")
        return out.sort_values(ascending=False, kind="stable")

    # --- persistence -----------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        """The subclass's own fitted state (JSON-serialisable)."""
        return {}

    def _restore(self, state: dict[str, Any]) -> None:
        """Set the subclass's own state from a saved file."""

    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {"format": FORMAT, "kind": self.kind, "service": self.service, "features": self.features,
                "categories": self.categories, "params": self.params, "best_iteration": self.best_iteration,
                "settings_fingerprint": self.settings_fingerprint, "versions": self.versions,
                **self._state(), "booster": self.booster.model_to_string()}

    def save(self, path: str | Path) -> Path:
        """Write the model (one JSON file) atomically."""
        target = Path(path)
        state = self.to_dict()
        with atomic_path(target) as tmp:
            tmp.write_text(json.dumps(state), encoding="utf-8")
        log.info("saved %s model to %s", self.kind, target)
        return target

    @classmethod
    def load(cls, path: str | Path, settings: Settings | None = None, check_versions: bool = True) -> Self:
        """Read a saved model, checking its kind, its feature order against the booster, its settings
        fingerprint against ``settings`` (when given) and its library versions against the installed ones.
        On ``LgbModel`` itself, any kind (as :func:`load_model`)."""
        import lightgbm as lgb

        path = Path(path)
        what = f"{cls.kind} model" if cls.kind else "model"
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"cannot read {what} {path}: {e}") from None
        if not isinstance(state, dict):
            raise ModelLoadError(f"{path} is not a saved model (a JSON {type(state).__name__})")
        kind = state.get("kind")
        target: type[LgbModel] = cls
        if not cls.kind:
            if kind == "next_purchase":
                import training.next_purchase  # noqa: F401  (registers the kind; it imports this module)
            target = LgbModel._kinds.get(kind) if isinstance(kind, str) else None  # type: ignore[assignment]
            if target is None:
                raise ModelLoadError(f"{path}: unknown model kind {kind!r}; the kinds are "
                                     f"{', '.join(sorted(LgbModel._kinds))}")
        if state.get("format") != FORMAT or kind != target.kind:
            raise ModelLoadError(f"{path} is not a {target.kind} model of format {FORMAT} (format "
                                 f"{state.get('format')!r}, kind {kind!r})")
        booster = lgb.Booster(model_str=state["booster"])
        model: Self = target.__new__(target)  # type: ignore[assignment]
        LgbModel.__init__(model, service=state["service"], features=state["features"], params=state["params"])
        model._restore(state)
        want_cols, have_cols = model._model_features(), booster.feature_name()
        if have_cols != want_cols:
            diff = next(i for i, (a, b) in enumerate(zip(have_cols, want_cols, strict=False))
                        if a != b) if len(have_cols) == len(want_cols) else None
            raise ModelLoadError(f"{path}: feature order differs from the booster's"
                                 + (f" at position {diff}: saved {want_cols[diff]!r}, booster "
                                    f"{have_cols[diff]!r}" if diff is not None else
                                    f": {len(want_cols)} saved, {len(have_cols)} in the booster"))
        unknown = [f for f in state["categories"] if f not in state["features"]]
        if unknown:
            raise ModelLoadError(f"{path}: categories for unknown feature(s) {', '.join(unknown)}")
        if settings is not None:
            want = target.fingerprint(settings)
            if state["settings_fingerprint"] not in (None, want):
                raise ModelLoadError(f"{path}: settings fingerprint differs: the model was trained with "
                                     f"{state['settings_fingerprint']}, these settings give {want} "
                                     f"({target._fingerprint_covers})")
        if check_versions:
            have = library_versions()
            diffs = [f"{k} {v} (saved) vs {have.get(k)} (installed)" for k, v in state["versions"].items()
                     if have.get(k) != v]
            if diffs:
                raise ModelLoadError(f"{path}: library versions differ: {'; '.join(diffs)}")
        model.settings_fingerprint = state["settings_fingerprint"]
        model.categories = {k: list(v) for k, v in state["categories"].items()}
        model.best_iteration = state["best_iteration"]
        model.versions = dict(state["versions"])
        model.booster = booster
        return model


def load_model(path: str | Path, settings: Settings | None = None, check_versions: bool = True) -> LgbModel:
    """Read a saved model of any kind (``churn``, ``value``, ``next_purchase``), with the checks of
    :meth:`LgbModel.load`."""
    return LgbModel.load(path, settings=settings, check_versions=check_versions)


class ChurnModel(LgbModel):
    """P(no purchase in the next H days) from LightGBM (binary), isotonic-calibrated on a later time fold.

    Risk never falls as ``recency_days`` or ``recency_gap_ratio`` grows (monotone constraints). ``bands``
    are (name, lower threshold) in increasing order; with ``settings`` they default to
    ``settings.training.churn_bands``. See the module docstring for an example.
    """

    kind = "churn"
    default_service = "churn_v1"
    objective: ClassVar[dict[str, Any]] = {"objective": "binary"}

    def __init__(self, settings: Settings | None = None, service: str = "churn_v1",
                 features: Sequence[str] | None = None, params: dict[str, Any] | None = None,
                 num_boost_round: int | None = None, early_stopping_rounds: int = 30,
                 bands: Sequence[tuple[str, float]] | None = None, num_threads: int | None = None,
                 seed: int = 7) -> None:
        super().__init__(settings=settings, service=service, features=features, params=params,
                         num_boost_round=num_boost_round, early_stopping_rounds=early_stopping_rounds,
                         num_threads=num_threads, seed=seed)
        if bands is None:
            bands = tuple(settings.training.churn_bands.items()) if settings is not None else DEFAULT_BANDS
        self.bands = self._check_bands(bands)
        self.calibration: dict[str, list[float]] | None = None

    @staticmethod
    def _check_bands(bands: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
        out = [(str(n), float(t)) for n, t in bands]
        if not out or [t for _, t in out] != sorted(t for _, t in out):
            raise ValueError(f"bands must be (name, lower threshold) in increasing order, got {out}")
        return out

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

        train_frame = self._prepare_fit(train_frame, valid_frame)
        assert self.features is not None
        x_tr, x_va = self._matrix(train_frame), self._matrix(valid_frame)
        y_tr, y_va = self._labels(train_frame, "training"), self._labels(valid_frame, "validation")
        params = dict(self.params)
        params["monotone_constraints"] = [1 if f in MONOTONE_UP else 0 for f in self.features]
        params["monotone_constraints_method"] = "intermediate"
        d_tr = lgb.Dataset(x_tr, y_tr, categorical_feature=list(self.categories) or "auto",
                           free_raw_data=False)
        d_va = lgb.Dataset(x_va, y_va, reference=d_tr)
        self._train(params, d_tr, d_va)
        raw = self._raw(self._array(valid_frame))
        knots_x, knots_y = _isotonic(raw, y_va)
        self.calibration = {"x": knots_x.tolist(), "y": knots_y.tolist()}
        log.info("churn model: %d features, %d rounds (best %d), trained on %d rows, calibrated on %d",
                 len(self.features), self.booster.current_iteration(), self.best_iteration, len(x_tr),
                 len(x_va))
        return self

    # --- prediction ------------------------------------------------------------------------------------

    def _is_fitted(self) -> bool:
        return super()._is_fitted() and self.calibration is not None

    def predict_raw(self, frame: pd.DataFrame) -> np.ndarray:
        """Uncalibrated LightGBM probabilities (one thread, raw Booster)."""
        self._check_fitted()
        return self._raw(self._array(frame))

    def predict_proba(self, frame: Frame) -> np.ndarray:
        """Calibrated churn probabilities, one per row of ``frame``."""
        self._check_fitted()
        assert self.calibration is not None
        raw = self._raw(self._array(frame))
        cache = self.__dict__.get("_calibration_arrays")
        if cache is None or cache[0] is not self.calibration:  # the saved lists, converted once, not per call
            cache = (self.calibration, np.asarray(self.calibration["x"], dtype=np.float64),
                     np.asarray(self.calibration["y"], dtype=np.float64))
            self.__dict__["_calibration_arrays"] = cache
        p = np.interp(raw, cache[1], cache[2])
        return np.clip(p, _P_EPS, 1 - _P_EPS)

    def band(self, p: Any) -> np.ndarray:
        """Band name of each probability: the last band whose lower threshold is <= p."""
        q = np.atleast_1d(np.asarray(p, dtype=float))
        names = np.array([n for n, _ in self.bands], dtype=object)
        lows = np.array([t for _, t in self.bands])
        idx = np.clip(np.searchsorted(lows, q, side="right") - 1, 0, len(lows) - 1)
        return names[idx]

    def reasons(self, frame: Frame, top: int = 3, bands: tuple[str, ...] | None = None,
                proba: np.ndarray | None = None, skip_stages: tuple[str, ...] = ()) -> list[list[str]]:
        """Per row, up to ``top`` plain-word reasons: the features that push this member's risk up most
        (LightGBM SHAP contributions, ``pred_contrib``), described with their values.

        ``bands``: explain only the rows whose churn band is one of these; ``skip_stages``: nor the rows
        whose lifecycle stage is one of these (a churned member has lapsed already); the others get no
        reasons. SHAP is the costly part of scoring (~1 ms a row against ~15 µs for the probability), so
        explaining only the members at risk is what makes a million members fit in minutes. ``proba``:
        the rows' probabilities, when the caller has them."""
        self._check_fitted()
        if bands is not None or skip_stages:
            p = self.predict_proba(frame) if proba is None else proba
            keep = np.isin(self.band(p), list(bands)) if bands is not None else np.ones(len(p), dtype=bool)
            if skip_stages and F.LIFECYCLE_STAGE in column_names(frame):
                keep &= ~np.isin(objects(frame, F.LIFECYCLE_STAGE).astype(str), list(skip_stages))
            rows = np.flatnonzero(keep)
            out: list[list[str]] = [[] for _ in range(n_rows(frame))]
            if len(rows):
                for i, r in zip(rows, self.reasons(take_rows(frame, rows), top=top), strict=True):
                    out[i] = r
            return out
        assert self.features is not None
        x = self._array(frame)
        contrib = np.asarray(self.booster.predict(x, num_iteration=self.best_iteration, pred_contrib=True,
                                                  num_threads=1))[:, : len(self.features)]
        # columns once, not a pandas row per member (frame.iloc[i] was ~1 ms a row)
        values = {f: objects(frame, f) for f in self.features}
        recency = values.get(F.RECENCY_DAYS)
        if recency is None and F.RECENCY_DAYS in column_names(frame):
            recency = objects(frame, F.RECENCY_DAYS)
        positive = contrib > 0
        out = []
        for i in range(n_rows(frame)):
            row = {F.RECENCY_DAYS: None if recency is None else recency[i]}
            order = np.argsort(-contrib[i], kind="stable")[: int(positive[i].sum())]
            picked: list[str] = []
            for j in order:
                if len(picked) >= top:
                    break
                f = self.features[j]
                # the gap ratio's words already name the recency
                if f == F.RECENCY_DAYS and any("usual gap" in r for r in picked):
                    continue
                text = _describe(f, values[f][i], row)
                if f == F.RECENCY_GAP_RATIO:
                    picked = [r for r in picked if not r.startswith("no purchase for")]
                if text not in picked:
                    picked.append(text)
            out.append(picked[:top])
        return out

    # --- persistence -----------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {"calibration": self.calibration, "bands": self.bands}

    def _restore(self, state: dict[str, Any]) -> None:
        self.bands = self._check_bands([tuple(b) for b in state["bands"]])
        self.calibration = state["calibration"]


class ValueModel(LgbModel):
    """Expected spend in the next ``settings.training.value_horizon_days`` days (label ``L.SPEND_NEXT``),
    from LightGBM with a Tweedie objective (most members spend nothing; the rest spend a skewed amount),
    stopped early on a later validation fold. Only rows whose spend window is observable can train it.

    Example::

        from training.dataset import build_training_set
        from training.models import ValueModel
        frame = build_training_set(settings, cutoffs, "value_v1")   # cutoffs a full year before the end
        cut = frame["event_timestamp"]
        train, valid = frame[cut < cut.max()], frame[cut == cut.max()]
        model = ValueModel(settings=settings).fit(train, valid)
        model.predict(frame)                     # expected spend in the next 365 days, >= 0
        model.feature_importance().head()
        model.save(path); ValueModel.load(path, settings=settings)
    """

    kind = "value"
    default_service = "value_v1"
    objective: ClassVar[dict[str, Any]] = {"objective": "tweedie", "tweedie_variance_power": 1.5}
    _fingerprint_covers: ClassVar[str] = "lifecycle, RFM, feature windows or the value horizon changed"

    def __init__(self, settings: Settings | None = None, service: str = "value_v1",
                 features: Sequence[str] | None = None, params: dict[str, Any] | None = None,
                 num_boost_round: int | None = None, early_stopping_rounds: int = 30, num_threads: int | None = None,
                 seed: int = 7) -> None:
        super().__init__(settings=settings, service=service, features=features, params=params,
                         num_boost_round=num_boost_round, early_stopping_rounds=early_stopping_rounds,
                         num_threads=num_threads, seed=seed)
        self.horizon_days: int | None = settings.training.value_horizon_days if settings is not None else None

    @classmethod
    def fingerprint(cls, settings: Settings) -> str:
        return settings_fingerprint(settings, {"value_horizon_days": settings.training.value_horizon_days})

    @staticmethod
    def _labels(frame: pd.DataFrame, what: str) -> np.ndarray:
        if L.SPEND_NEXT not in frame.columns:
            raise KeyError(f"{what} frame lacks the label column {L.SPEND_NEXT!r}")
        if L.SPEND_OBSERVABLE in frame.columns:
            seen = frame[L.SPEND_OBSERVABLE].fillna(False).to_numpy(dtype=bool)
            if not seen.all():
                row = int(np.flatnonzero(~seen)[0])
                raise ValueError(f"{what} frame: row {row}, column {L.SPEND_OBSERVABLE!r} is false (its spend "
                                 "window ends after the data); train on observable rows only")
        return nonnegative_column(frame, L.SPEND_NEXT, what, "spend")

    def fit(self, train_frame: pd.DataFrame, valid_frame: pd.DataFrame) -> ValueModel:
        """Fit on ``train_frame``; stop early on ``valid_frame``, which must be later."""
        import lightgbm as lgb

        train_frame = self._prepare_fit(train_frame, valid_frame)
        assert self.features is not None
        y_tr, y_va = self._labels(train_frame, "training"), self._labels(valid_frame, "validation")
        x_tr, x_va = self._matrix(train_frame), self._matrix(valid_frame)
        d_tr = lgb.Dataset(x_tr, y_tr, categorical_feature=list(self.categories) or "auto",
                           free_raw_data=False)
        d_va = lgb.Dataset(x_va, y_va, reference=d_tr)
        self._train(dict(self.params), d_tr, d_va)
        log.info("value model: %d features, %d rounds (best %d), trained on %d rows (mean spend %.2f)",
                 len(self.features), self.booster.current_iteration(), self.best_iteration, len(x_tr),
                 float(y_tr.mean()))
        return self

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Expected spend over the horizon, one per row of ``frame`` (>= 0)."""
        self._check_fitted()
        return np.maximum(self._raw(self._array(frame)), 0.0)

    def _state(self) -> dict[str, Any]:
        return {"horizon_days": self.horizon_days}

    def _restore(self, state: dict[str, Any]) -> None:
        self.horizon_days = state.get("horizon_days")

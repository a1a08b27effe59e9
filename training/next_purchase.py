"""Time to the next purchase as a discrete-time hazard on LightGBM, with right-censoring handled.

The days after a cutoff are cut into periods by ``settings.training.next_purchase_bins_days`` (right edges,
default 7, 14, 21, 30, 45, 60, 90, 120, 180, 270, 365). The model learns the hazard ``h_k = P(purchase in
period k | none before it)`` from person-period rows, one per entity row and period it was at risk in, with
time-varying columns (period start and width, recency at the period start, and that recency over the
member's usual gap). ``S(e_k) = prod_{j<=k} (1 - h_j)`` is then P(no purchase by edge ``e_k``), and inside a
period the hazard is taken as constant, so ``S(e_{k-1} + f w_k) = S(e_{k-1}) (1 - h_k)^f``.

The booster comes in two stages (``settings.training.next_purchase_period_trees``, default 60): the first
trees fit the person-period rows with every column; the rest fit the same rows with the period columns
held at 0, on top of the first stage's scores, so they depend on the member's columns only. Scoring walks
the first stage once per period and the second once per member: about 60 x 11 + 240 trees a member
instead of 300 x 11 (295 of 300 single-stage trees split on a period column, so nothing could be shared).
0 keeps every tree on the person-period rows.

One class serves two units: :meth:`NextPurchaseModel.member` (``next_purchase_v1``: any purchase) and
:meth:`NextPurchaseModel.category` (``next_purchase_category_v1``: the next purchase in one replenishable
category, with member, member x category features and the ``category`` itself).

Example::

    from training.dataset import build_training_set
    from training.next_purchase import NP, NextPurchaseModel
    frame = build_training_set(settings, cutoffs, "next_purchase_v1")
    cut = frame["event_timestamp"]
    train, valid = frame[cut < cut.max()], frame[cut == cut.max()]
    model = NextPurchaseModel.member(settings).fit(train, valid)
    out = model.predict(frame)          # expected_days, lower_days, upper_days, p_7d, p_30d, remind_days, ...
    out[NP.REMIND_DAYS]                 # days after the cutoff to send the reminder
    model.p_within(frame, 10)           # P(a purchase within 10 days)
    model.survival(frame)               # n x periods: P(no purchase by each right edge)
    model.save(path); NextPurchaseModel.load(path, settings=settings)
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from features.contract import FC, C, F
from features.settings import Settings, TrainingSettings
from training.labels import L
from training.models import Frame, LgbModel, column_names, floats, nonnegative_column

log = logging.getLogger(__name__)

MEMBER_SERVICE = "next_purchase_v1"
CATEGORY_SERVICE = "next_purchase_category_v1"
PERIOD_START = "period_start_days"
PERIOD_WIDTH = "period_width_days"
RECENCY_AT_START = "recency_at_period_start"
DUE_AT_START = "due_ratio_at_period_start"
PERIOD_FEATURES = (PERIOD_START, PERIOD_WIDTH, RECENCY_AT_START, DUE_AT_START)
"""Time-varying columns appended to the features of every person-period row, in this order."""
_PREDICT_CHUNK = 32_768  # entity rows per booster call: bounds the n x periods matrix (~100 MB)
_H_MAX = 1.0 - 1e-12


class NP:
    """Columns of :meth:`NextPurchaseModel.predict`; days are floats after the row's cutoff."""

    EXPECTED_DAYS = "expected_days"  # median time to the next purchase; NaN when beyond the last period
    LOWER_DAYS = "lower_days"  # lower end of the central `interval` (e.g. the 10% quantile)
    UPPER_DAYS = "upper_days"  # upper end (e.g. the 90% quantile); NaN when beyond the last period
    P_7D = "p_7d"  # P(a purchase within 7 days)
    P_30D = "p_30d"  # P(a purchase within 30 days)
    REMIND_DAYS = "remind_days"  # when to remind (see NextPurchaseModel.predict)
    BEYOND_HORIZON = "beyond_horizon"  # the median is beyond the last period
    COLUMNS = (EXPECTED_DAYS, LOWER_DAYS, UPPER_DAYS, P_7D, P_30D, REMIND_DAYS, BEYOND_HORIZON)


class NextPurchaseModel(LgbModel):
    """Discrete-time hazard of the next purchase (binary LightGBM on person-period rows).

    Training expands each entity row (member or member x category, at a cutoff) into one row per period
    up to the period of its outcome:

    - a purchase at day ``d`` in period ``k`` (``e_{k-1} <= d < e_k``): label 0 for periods ``< k``, 1 for
      ``k``;
    - censored at day ``d`` in period ``k`` (no purchase seen up to ``d``): label 0 for every period fully
      survived, and for the part-way period ``k`` a label-0 row weighted by the share of it observed,
      ``f = (d - e_{k-1}) / w_k`` (a row with ``f = 0`` is dropped). Under the constant hazard assumed inside
      a period, ``f * log(1 - h_k)`` is exactly the log-likelihood of surviving that share of the period,
      so this is the actuarial life-table correction, not the drop (which biases the hazard up when
      everyone is censored at the same day, as at the end of the data) nor a full survival (biased down);
    - a purchase or censoring at or after the last edge: label 0 in every period.

    ``duration``, ``event``, ``recency`` and ``gap`` name the label and feature columns for the unit;
    ``recency`` and ``gap`` must be in the frames (they drive the time-varying columns and the reminder),
    whether or not they are features. ``extra_features`` are appended to the frame's features
    (``category`` for the category unit) and ``categorical`` are forced to be categories. ``bins_days``,
    ``interval``, ``remind_quantile`` and ``remind_lead_days`` default to ``settings.training`` and are
    saved with the model. With settings, at most ``settings.training.max_train_rows`` entity rows train
    (sampled by member); the person-period rows are several times more.
    """

    kind = "next_purchase"
    default_service = MEMBER_SERVICE
    objective: ClassVar[dict[str, Any]] = {"objective": "binary"}

    def __init__(self, settings: Settings | None = None, service: str | None = None,
                 features: Sequence[str] | None = None, params: dict[str, Any] | None = None,
                 num_boost_round: int | None = None, early_stopping_rounds: int = 30, num_threads: int | None = None,
                 seed: int = 7, *, duration: str = L.DAYS_TO_NEXT, event: str = L.NEXT_EVENT,
                 recency: str = F.RECENCY_DAYS, gap: str = F.GAP_MEAN_DAYS,
                 extra_features: Sequence[str] = (), categorical: Sequence[str] = (),
                 bins_days: Sequence[float] | None = None, interval: float | None = None,
                 remind_quantile: float | None = None, remind_lead_days: float | None = None,
                 period_trees: int | None = None) -> None:
        super().__init__(settings=settings, service=service, features=features, params=params,
                         num_boost_round=num_boost_round, early_stopping_rounds=early_stopping_rounds,
                         num_threads=num_threads, seed=seed)
        training = settings.training if settings is not None else TrainingSettings()
        self.duration, self.event, self.recency, self.gap = duration, event, recency, gap
        self.extra_features = list(extra_features)
        self.categorical = list(categorical)
        self.bins_days = [float(b) for b in (training.next_purchase_bins_days if bins_days is None
                                             else bins_days)]
        self.interval = float(training.interval if interval is None else interval)
        self.remind_quantile = float(training.remind_quantile if remind_quantile is None else remind_quantile)
        self.remind_lead_days = float(training.remind_lead_days if remind_lead_days is None
                                      else remind_lead_days)
        self.period_trees = int(training.next_purchase_period_trees if period_trees is None else period_trees)
        self.member_booster: Any = None
        self.member_best_iteration = 0
        self._check_rules()

    @classmethod
    def member(cls, settings: Settings | None = None, **kwargs: Any) -> NextPurchaseModel:
        """Days to a member's next purchase of anything (``next_purchase_v1``)."""
        return cls(settings, **{"service": MEMBER_SERVICE, "duration": L.DAYS_TO_NEXT, "event": L.NEXT_EVENT,
                                "recency": F.RECENCY_DAYS, "gap": F.GAP_MEAN_DAYS, **kwargs})

    @classmethod
    def category(cls, settings: Settings | None = None, **kwargs: Any) -> NextPurchaseModel:
        """Days to a member's next purchase in one category (``next_purchase_category_v1``): member and
        member x category features plus the ``category`` column as a categorical feature."""
        return cls(settings, **{"service": CATEGORY_SERVICE, "duration": L.CAT_DAYS_TO_NEXT,
                                "event": L.CAT_NEXT_EVENT, "recency": FC.CAT_RECENCY_DAYS,
                                "gap": FC.CAT_GAP_MEAN_DAYS, "extra_features": (C.CATEGORY,),
                                "categorical": (C.CATEGORY,), **kwargs})

    def _check_rules(self) -> None:
        b = self.bins_days
        if not b or b[0] <= 0 or any(y <= x for x, y in itertools.pairwise(b)):
            raise ValueError(f"bins_days must be positive and strictly increasing, got {b}")
        if not 0 < self.interval < 1 or not 0 < self.remind_quantile < 1:
            raise ValueError(f"interval ({self.interval}) and remind_quantile ({self.remind_quantile}) must be "
                             "strictly between 0 and 1")
        if self.remind_lead_days < 0:
            raise ValueError(f"remind_lead_days must be >= 0, got {self.remind_lead_days}")
        self._edges = np.asarray(b, dtype=np.float64)
        self._starts = np.concatenate([[0.0], self._edges[:-1]])
        self._widths = self._edges - self._starts

    @property
    def horizon_days(self) -> float:
        """The last period's right edge: nothing is predicted beyond it."""
        return float(self._edges[-1])

    def _feature_list(self, frame: pd.DataFrame) -> list[str]:
        feats = super()._feature_list(frame)
        return [*feats, *(f for f in self.extra_features if f not in feats)]

    def _model_features(self) -> list[str]:
        return [*super()._model_features(), *PERIOD_FEATURES]

    # --- person-period rows ----------------------------------------------------------------------------

    def _recency_gap(self, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
        missing = [c for c in (self.recency, self.gap) if c not in column_names(frame)]
        if missing:
            raise KeyError(f"frame lacks column(s) {', '.join(missing)} (recency and usual gap of the "
                           f"{self.service} model)")
        return floats(frame, self.recency), floats(frame, self.gap)

    def _period_columns(self, out: np.ndarray, rec: np.ndarray, gap: np.ndarray, period: np.ndarray) -> None:
        """Fill the last ``len(PERIOD_FEATURES)`` columns of ``out`` (rows already matched to ``rec``/``gap``)."""
        p = out.shape[-1] - len(PERIOD_FEATURES)
        start = self._starts[period]
        rec_start = rec + start
        out[..., p] = start
        out[..., p + 1] = self._widths[period]
        out[..., p + 2] = rec_start
        with np.errstate(divide="ignore", invalid="ignore"):
            out[..., p + 3] = np.where(gap > 0, rec_start / gap, np.nan)

    def _expand(self, x: np.ndarray, rec: np.ndarray, gap: np.ndarray, rep: np.ndarray,
                period: np.ndarray) -> np.ndarray:
        """Person-period matrix: entity features of row ``rep[i]`` and the columns of period ``period[i]``."""
        out = np.empty((len(rep), x.shape[1] + len(PERIOD_FEATURES)), dtype=np.float64)
        out[:, : x.shape[1]] = x[rep]
        self._period_columns(out, rec[rep], gap[rep], period)
        return out

    def _expand_all(self, x: np.ndarray, rec: np.ndarray, gap: np.ndarray,
                    buffer: np.ndarray | None = None) -> np.ndarray:
        """Every row in every period, row-major (row i's periods are rows i*K .. i*K+K-1), written into
        ``buffer`` when given (reused across chunks: fresh pages cost more than the copy itself)."""
        n, k = len(x), len(self._edges)
        shape = (n, k, x.shape[1] + len(PERIOD_FEATURES))
        out = np.empty(shape) if buffer is None else buffer.reshape(-1)[: np.prod(shape)].reshape(shape)
        out[:, :, : x.shape[1]] = x[:, None, :]
        self._period_columns(out, rec[:, None], gap[:, None], np.arange(k)[None, :])
        return out.reshape(n * k, -1)

    def _outcomes(self, frame: pd.DataFrame, what: str) -> tuple[np.ndarray, np.ndarray]:
        for col in (self.duration, self.event):
            if col not in frame.columns:
                raise KeyError(f"{what} frame lacks the label column {col!r}")
        d = nonnegative_column(frame, self.duration, what, "days to the next purchase")
        ev = frame[self.event]
        if ev.isna().any():
            row = int(np.flatnonzero(ev.isna().to_numpy())[0])
            raise ValueError(f"{what} frame: row {row}, column {self.event!r} is missing")
        return d, ev.to_numpy(dtype=bool)

    def _person_periods(self, frame: pd.DataFrame, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(matrix, label, weight) of the person-period rows of ``frame`` (see the class docstring)."""
        d, event = self._outcomes(frame, what)
        rec, gap = self._recency_gap(frame)
        n_periods = len(self._edges)
        k = np.searchsorted(self._edges, d, side="right")  # period holding d; n_periods: at or past the end
        inside = k < n_periods
        last = np.minimum(k, n_periods - 1)
        counts = last + 1
        rep = np.repeat(np.arange(len(d)), counts)
        period = np.arange(len(rep)) - np.repeat(np.cumsum(counts) - counts, counts)
        at_outcome = (period == k[rep]) & inside[rep]
        label = (at_outcome & event[rep]).astype(np.float64)
        frac = (d - self._starts[last]) / self._widths[last]
        weight = np.where(at_outcome & ~event[rep], frac[rep], 1.0)
        keep = weight > 0
        rep, period, label, weight = rep[keep], period[keep], label[keep], weight[keep]
        x = self._expand(self._array(frame), rec, gap, rep, period)
        return x, label, weight

    # --- fitting ---------------------------------------------------------------------------------------

    def fit(self, train_frame: pd.DataFrame, valid_frame: pd.DataFrame) -> NextPurchaseModel:
        """Fit on ``train_frame``; stop early on ``valid_frame`` (person-period log loss), which must be
        later."""
        import lightgbm as lgb

        train_frame = self._prepare_fit(train_frame, valid_frame, categorical=self.categorical)
        assert self.features is not None
        clash = [f for f in PERIOD_FEATURES if f in self.features]
        if clash:
            raise ValueError(f"feature name(s) {', '.join(clash)} are reserved for the period columns")
        x_tr, y_tr, w_tr = self._person_periods(train_frame, "training")
        x_va, y_va, w_va = self._person_periods(valid_frame, "validation")
        if len(y_va) == 0 or len(y_tr) == 0:
            raise ValueError("fit needs person-period rows in both folds (every row censored at day 0?)")
        names = self._model_features()
        cats = list(self.categories)
        d_tr = lgb.Dataset(x_tr, y_tr, weight=w_tr, feature_name=names, categorical_feature=cats,
                           free_raw_data=False)
        d_va = lgb.Dataset(x_va, y_va, weight=w_va, reference=d_tr, free_raw_data=False)
        total = self.num_boost_round
        two_stage = 0 < self.period_trees < total
        if two_stage:
            self.num_boost_round = self.period_trees
        try:
            self._train(dict(self.params), d_tr, d_va)
        finally:
            self.num_boost_round = total
        self.member_booster, self.member_best_iteration = None, 0
        if two_stage:
            # stage 2: trees on the member columns only (period columns held at 0), on top of stage 1's
            # scores; evaluated once per member when scoring
            init_tr = self.booster.predict(x_tr, num_iteration=self.best_iteration, raw_score=True)
            init_va = self.booster.predict(x_va, num_iteration=self.best_iteration, raw_score=True)
            p = len(PERIOD_FEATURES)
            x_tr[:, -p:] = 0.0
            x_va[:, -p:] = 0.0
            m_tr = lgb.Dataset(x_tr, y_tr, weight=w_tr, init_score=init_tr, feature_name=names,
                               categorical_feature=cats, free_raw_data=True)
            m_va = lgb.Dataset(x_va, y_va, weight=w_va, init_score=init_va, reference=m_tr)
            self.member_booster = lgb.train(
                dict(self.params), m_tr, num_boost_round=total - self.best_iteration, valid_sets=[m_va],
                valid_names=["valid"], callbacks=[lgb.early_stopping(self.early_stopping_rounds, verbose=False)])
            self.member_best_iteration = int(self.member_booster.best_iteration
                                             or self.member_booster.current_iteration())
        log.info("%s model: %d features, %d period trees + %d member trees, %d entity rows -> %d person-period "
                 "rows (%.1f%% events)", self.service, len(self.features), self.best_iteration,
                 self.member_best_iteration, len(train_frame), len(y_tr), 100 * y_tr.mean())
        return self

    # --- prediction ------------------------------------------------------------------------------------

    def hazard(self, frame: Frame) -> np.ndarray:
        """n x periods: P(purchase in period k | none before it), from one booster call per 32k rows on all
        their periods at once (one thread, raw Booster)."""
        self._check_fitted()
        x = self._array(frame)
        rec, gap = self._recency_gap(frame)
        n, n_periods = len(x), len(self._edges)
        out = np.empty((n, n_periods), dtype=np.float64)
        buffer = np.empty(min(n, _PREDICT_CHUNK) * n_periods * (x.shape[1] + len(PERIOD_FEATURES)))
        for lo in range(0, n, _PREDICT_CHUNK):
            hi = min(lo + _PREDICT_CHUNK, n)
            rows = self._expand_all(x[lo:hi], rec[lo:hi], gap[lo:hi], buffer)
            if self.member_booster is None:
                out[lo:hi] = self._raw(rows).reshape(hi - lo, n_periods)
                continue
            period = self.booster.predict(rows, num_iteration=self.best_iteration, raw_score=True, num_threads=1)
            member = np.zeros((hi - lo, rows.shape[1]))
            member[:, : x.shape[1]] = x[lo:hi]
            shift = self.member_booster.predict(member, num_iteration=self.member_best_iteration, raw_score=True,
                                                num_threads=1)
            z = period.reshape(hi - lo, n_periods) + shift[:, None]
            out[lo:hi] = 1.0 / (1.0 + np.exp(-z))
        return np.clip(out, 0.0, _H_MAX)

    @property
    def final_booster(self) -> Any:
        """The booster whose validation score is the whole model's: stage 2 when there is one."""
        return self.member_booster if self.member_booster is not None else self.booster

    def feature_importance(self) -> pd.Series:
        """Total gain of each column over both stages, largest first."""
        out = super().feature_importance()
        if self.member_booster is not None:
            gain = self.member_booster.feature_importance(importance_type="gain",
                                                         iteration=self.member_best_iteration)
            extra = pd.Series(np.asarray(gain, dtype=float), index=pd.Index(self.member_booster.feature_name(),
                                                                              name="feature"))
            out = out.add(extra, fill_value=0.0).rename("gain")
        return out.sort_values(ascending=False, kind="stable")

    def survival(self, frame: pd.DataFrame) -> np.ndarray:
        """n x periods: P(no purchase by each period's right edge, ``bins_days``)."""
        return np.cumprod(1.0 - self.hazard(frame), axis=1)

    def p_within(self, frame: pd.DataFrame, days: float) -> np.ndarray:
        """P(a purchase within ``days`` of the cutoff), per row; constant hazard inside a period. ``days``
        beyond the last period is an error (the model knows nothing past it)."""
        if days > self.horizon_days:
            raise ValueError(f"days ({days}) is beyond the model's last period ({self.horizon_days:g} days)")
        h = self.hazard(frame)
        return 1.0 - self._survival_at(h, np.cumprod(1.0 - h, axis=1), float(days))

    def _survival_at(self, h: np.ndarray, s: np.ndarray, days: float) -> np.ndarray:
        if days > self.horizon_days:
            return np.full(len(h), np.nan)
        if days <= 0:
            return np.ones(len(h))
        k = int(np.searchsorted(self._edges, days, side="left"))
        prev = s[:, k - 1] if k > 0 else np.ones(len(h))
        return prev * (1.0 - h[:, k]) ** ((days - self._starts[k]) / self._widths[k])

    def _days_at(self, h: np.ndarray, s: np.ndarray, q: float) -> np.ndarray:
        """Per row, the day where P(bought) = 1 - S reaches ``q``; NaN when not within the last period."""
        reached = s <= 1.0 - q
        k = reached.argmax(axis=1)
        rows = np.arange(len(h))
        ok = reached[rows, k]
        prev = np.where(k > 0, s[rows, np.maximum(k - 1, 0)], 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.log((1.0 - q) / prev) / np.log1p(-h[rows, k])
        frac = np.clip(np.nan_to_num(frac, nan=0.0), 0.0, 1.0)
        return np.where(ok, self._starts[k] + frac * self._widths[k], np.nan)

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The next-purchase summary of each row of ``frame`` (index like ``frame``), columns ``NP.*``:

        - ``expected_days``: the median, where P(bought) reaches 0.5 (NaN beyond the last period, and then
          ``beyond_horizon`` is true);
        - ``lower_days`` / ``upper_days``: the central ``interval`` (e.g. the 10% and 90% quantiles; NaN
          beyond the last period);
        - ``p_7d``, ``p_30d``: P(a purchase within 7 / 30 days) (NaN if the last period ends earlier);
        - ``remind_days``: the day P(bought) reaches ``remind_quantile``, but never later than
          ``remind_lead_days`` before the usual cycle ends (``gap - recency - remind_lead_days``) and never
          below 0. Without a usual gap only the quantile rule applies (NaN if it is not reached); without a
          reached quantile, the cycle rule alone.
        """
        return pd.DataFrame(self.summary(frame), index=frame.index if isinstance(frame, pd.DataFrame) else None)

    def summary(self, frame: Frame) -> dict[str, np.ndarray]:
        """What :meth:`predict` answers, as one array per ``NP`` column (``frame`` may be a column mapping)."""
        h = self.hazard(frame)
        s = np.cumprod(1.0 - h, axis=1)
        tail = (1.0 - self.interval) / 2
        rec, gap = self._recency_gap(frame)
        by_quantile = self._days_at(h, s, self.remind_quantile)
        by_cycle = gap - rec - self.remind_lead_days
        remind = np.maximum(np.fmin(by_quantile, by_cycle), 0.0)  # fmin: a NaN rule leaves the other
        return {
            NP.EXPECTED_DAYS: self._days_at(h, s, 0.5),
            NP.LOWER_DAYS: self._days_at(h, s, tail),
            NP.UPPER_DAYS: self._days_at(h, s, 1.0 - tail),
            NP.P_7D: 1.0 - self._survival_at(h, s, 7.0),
            NP.P_30D: 1.0 - self._survival_at(h, s, 30.0),
            NP.REMIND_DAYS: remind,
            NP.BEYOND_HORIZON: s[:, -1] > 0.5,
        }

    # --- persistence -----------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {"columns": {"duration": self.duration, "event": self.event, "recency": self.recency,
                            "gap": self.gap},
                "extra_features": self.extra_features, "categorical": self.categorical,
                "bins_days": self.bins_days, "interval": self.interval, "remind_quantile": self.remind_quantile,
                "remind_lead_days": self.remind_lead_days, "period_features": list(PERIOD_FEATURES),
                "period_trees": self.period_trees, "member_best_iteration": self.member_best_iteration,
                "member_booster": None if self.member_booster is None else self.member_booster.model_to_string()}

    def _restore(self, state: dict[str, Any]) -> None:
        cols = state["columns"]
        self.duration, self.event, self.recency, self.gap = (cols["duration"], cols["event"], cols["recency"],
                                                             cols["gap"])
        self.extra_features = list(state["extra_features"])
        self.categorical = list(state["categorical"])
        self.bins_days = [float(b) for b in state["bins_days"]]
        self.interval = float(state["interval"])
        self.remind_quantile = float(state["remind_quantile"])
        self.remind_lead_days = float(state["remind_lead_days"])
        self.period_trees = int(state.get("period_trees", 0))
        self.member_best_iteration = int(state.get("member_best_iteration", 0))
        self.member_booster = None
        if state.get("member_booster"):
            import lightgbm as lgb

            self.member_booster = lgb.Booster(model_str=state["member_booster"])
        self._check_rules()

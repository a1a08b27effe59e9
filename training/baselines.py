"""Baselines every model is reported beside: BG/NBD, an RFM rule, and the member's own mean gap.

BG/NBD (Fader, Hardie & Lee 2005, "Counting your customers the easy way") is implemented here with numpy
and scipy (``gammaln``, ``hyp2f1``, L-BFGS-B on log parameters) rather than taken from a library, because
none of the candidates fits the pinned stack:

- ``lifetimes`` 0.11.3 is unmaintained since 2020 (archived; it relies on autograd and on pandas and numpy
  behaviour that pandas 2 / numpy 2 removed);
- ``btyd`` 0.1b3 is a 2022 beta with no release since;
- ``pymc-marketing`` is maintained but pulls in pymc and pytensor (a compiler tool-chain at import) for a
  four-parameter maximum-likelihood fit.

The closed forms are the paper's equations (6), (10) and the P(alive) expression of its technical note;
on the CDNOW 1/10 sample they give the published r = 0.243, alpha = 4.414, a = 0.793, b = 2.426.

Example::

    from training.baselines import BgNbd
    from training.labels import L, split_calibration_holdout
    s = split_calibration_holdout(tx, date(1997, 10, 1), date(1998, 6, 30), unit_days=7)
    model = BgNbd().fit(s[L.FREQUENCY_CAL], s[L.RECENCY_CAL], s[L.T_CAL])
    model.params_                       # BgNbdParams(r=..., alpha=..., a=..., b=..., ...)
    model.expected_purchases(39, s[L.FREQUENCY_CAL], s[L.RECENCY_CAL], s[L.T_CAL]).sum()
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy.optimize import minimize
from scipy.special import betaln, gammaln, hyp2f1

log = logging.getLogger(__name__)

ArrayLike = npt.ArrayLike


@dataclass(frozen=True)
class BgNbdParams:
    """Fitted BG/NBD parameters: purchase rates ~ Gamma(r, alpha), drop-out probability ~ Beta(a, b)."""

    r: float
    alpha: float
    a: float
    b: float
    log_likelihood: float
    n_customers: int
    converged: bool


def _summaries(frequency: ArrayLike, recency: ArrayLike, T: ArrayLike) -> tuple[np.ndarray, ...]:  # noqa: N803
    x = np.asarray(frequency, dtype=float)
    t_x = np.asarray(recency, dtype=float)
    t = np.asarray(T, dtype=float)
    if not (x.shape == t_x.shape == t.shape) or x.ndim != 1:
        raise ValueError(f"frequency, recency and T must be 1-d arrays of one length, got shapes "
                         f"{x.shape}, {t_x.shape}, {t.shape}")
    for name, v in (("frequency", x), ("recency", t_x), ("T", t)):
        bad = ~np.isfinite(v) | (v < 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{name} must be finite and >= 0; position {i} is {v[i]!r}")
    if (x != np.round(x)).any():
        i = int(np.flatnonzero(x != np.round(x))[0])
        raise ValueError(f"frequency must be a whole number of repeat purchases; position {i} is {x[i]!r}")
    bad = t_x > t + 1e-9
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"recency must not exceed T; position {i} has recency {t_x[i]} > T {t[i]}")
    bad = (x == 0) & (t_x != 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"recency must be 0 when frequency is 0; position {i} has recency {t_x[i]}")
    return x, t_x, t


def _log_likelihood(r: float, alpha: float, a: float, b: float, x: np.ndarray, t_x: np.ndarray,
                    t: np.ndarray) -> np.ndarray:
    """Per-customer log-likelihood, FHL (2005) eq. (6)."""
    a1 = gammaln(r + x) - gammaln(r) + r * np.log(alpha)
    a2 = betaln(a, b + x) - betaln(a, b)
    a3 = -(r + x) * np.log(alpha + t)
    with np.errstate(divide="ignore", invalid="ignore"):
        a4 = np.where(x > 0, np.log(a) - np.log(np.maximum(b + x - 1, 1e-300))
                      - (r + x) * np.log(alpha + t_x), -np.inf)
    return a1 + a2 + np.logaddexp(a3, a4)


class BgNbd:
    """The BG/NBD model fitted by maximum likelihood on (frequency, recency, T) summaries.

    ``frequency`` is the number of repeat purchases, ``recency`` the time from the first to the last
    purchase, ``T`` the time from the first purchase to the end of calibration, all in one unit (days or
    weeks; see :func:`training.labels.split_calibration_holdout`).
    """

    def __init__(self, penalizer: float = 0.0) -> None:
        self.penalizer = penalizer
        self.params_: BgNbdParams | None = None

    def fit(self, frequency: ArrayLike, recency: ArrayLike, T: ArrayLike,  # noqa: N803
            initial: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)) -> BgNbd:
        x, t_x, t = _summaries(frequency, recency, T)
        if len(x) == 0:
            raise ValueError("BG/NBD needs at least one customer")
        # customers with the same summary contribute the same term: fit on the distinct rows, weighted
        uniq, counts = np.unique(np.column_stack([x, t_x, t]), axis=0, return_counts=True)
        ux, utx, ut = uniq[:, 0], uniq[:, 1], uniq[:, 2]
        w = counts.astype(float)
        n = w.sum()
        scale = max(float(np.median(t)), 1e-9)  # start alpha on the data's time scale

        def objective(theta: np.ndarray) -> float:
            r, alpha, a, b = np.exp(theta)
            ll = float(np.dot(w, _log_likelihood(r, alpha, a, b, ux, utx, ut)))
            penalty = self.penalizer * float(np.sum(np.exp(theta) ** 2))
            value = -(ll / n) + penalty
            return value if np.isfinite(value) else 1e10

        start = np.log(np.array([initial[0], initial[1] * scale / 10, initial[2], initial[3]]))
        res = minimize(objective, start, method="L-BFGS-B", options={"maxiter": 2000, "gtol": 1e-10,
                                                                    "ftol": 1e-14})
        if not res.success:  # a second go from the first answer usually settles a flat valley
            res = minimize(objective, res.x, method="Nelder-Mead",
                           options={"maxiter": 20000, "xatol": 1e-10, "fatol": 1e-14})
        r, alpha, a, b = (float(v) for v in np.exp(res.x))
        ll = float(np.dot(w, _log_likelihood(r, alpha, a, b, ux, utx, ut)))
        self.params_ = BgNbdParams(r=r, alpha=alpha, a=a, b=b, log_likelihood=ll, n_customers=int(n),
                                   converged=bool(res.success))
        log.info("BG/NBD fitted on %d customers: r=%.4g alpha=%.4g a=%.4g b=%.4g LL=%.6g (converged %s)",
                 int(n), r, alpha, a, b, ll, res.success)
        if not res.success:
            log.warning("BG/NBD optimiser did not report convergence: %s", res.message)
        return self

    def _p(self) -> BgNbdParams:
        if self.params_ is None:
            raise RuntimeError("BgNbd is not fitted; call fit() first")
        return self.params_

    def log_likelihood(self, frequency: ArrayLike, recency: ArrayLike, T: ArrayLike) -> np.ndarray:  # noqa: N803
        """Per-customer log-likelihood under the fitted parameters."""
        p = self._p()
        return _log_likelihood(p.r, p.alpha, p.a, p.b, *_summaries(frequency, recency, T))

    def p_alive(self, frequency: ArrayLike, recency: ArrayLike, T: ArrayLike) -> np.ndarray:  # noqa: N803
        """P(still active at T | history). 1 for customers without a repeat purchase (the model lets a
        customer drop out only right after a purchase)."""
        p = self._p()
        x, t_x, t = _summaries(frequency, recency, T)
        with np.errstate(divide="ignore", over="ignore"):
            odds = np.where(x > 0, p.a / np.maximum(p.b + x - 1, 1e-300)
                            * np.exp((p.r + x) * (np.log(p.alpha + t) - np.log(p.alpha + t_x))), 0.0)
        return 1.0 / (1.0 + odds)

    def expected_purchases(self, t: float, frequency: ArrayLike, recency: ArrayLike,
                           T: ArrayLike) -> np.ndarray:  # noqa: N803
        """Expected purchases in (T, T + t] given the history, FHL (2005) eq. (10)."""
        p = self._p()
        x, t_x, big_t = _summaries(frequency, recency, T)
        if t < 0:
            raise ValueError(f"t must be >= 0, got {t}")
        r, alpha, a, b = p.r, p.alpha, p.a, p.b
        z = t / (alpha + big_t + t)
        hyp = hyp2f1(r + x, b + x, a + b + x - 1, z)
        term = 1.0 - np.exp((r + x) * (np.log(alpha + big_t) - np.log(alpha + big_t + t))) * hyp
        numer = (a + b + x - 1) / (a - 1) * term
        with np.errstate(divide="ignore", over="ignore"):
            odds = np.where(x > 0, a / np.maximum(b + x - 1, 1e-300)
                            * np.exp((r + x) * (np.log(alpha + big_t) - np.log(alpha + t_x))), 0.0)
        return numer / (1.0 + odds)

    def expected_purchases_new(self, t: ArrayLike) -> np.ndarray:
        """Expected purchases in (0, t] of a customer just acquired, FHL (2005) eq. (9)."""
        p = self._p()
        tt = np.asarray(t, dtype=float)
        return (p.a + p.b - 1) / (p.a - 1) * (
            1.0 - (p.alpha / (p.alpha + tt)) ** p.r * hyp2f1(p.r, p.b, p.a + p.b - 1, tt / (p.alpha + tt)))

    def p_purchase_within(self, t: float, frequency: ArrayLike, recency: ArrayLike,
                          T: ArrayLike) -> np.ndarray:  # noqa: N803
        """P(at least one purchase in (T, T + t] | history) = P(alive) x (1 - P(no purchase in t | alive)).

        Given alive, the posterior purchase rate is Gamma(r + x, alpha + T), so P(no purchase in t) is
        ((alpha + T) / (alpha + T + t)) ** (r + x). A churn score is 1 minus this.
        """
        p = self._p()
        x, t_x, big_t = _summaries(frequency, recency, T)
        none = np.exp((p.r + x) * (np.log(p.alpha + big_t) - np.log(p.alpha + big_t + t)))
        return self.p_alive(x, t_x, big_t) * (1.0 - none)


# --- RFM rule ---------------------------------------------------------------------------------------------


def quantile_scores(values: ArrayLike, bins: int = 5) -> np.ndarray:
    """Scores 1..bins by quantile of ``values`` (higher value, higher score; ties share the average rank);
    0 where the value is missing."""
    v = np.asarray(values, dtype=float)
    out = np.zeros(len(v), dtype=np.int64)
    ok = ~np.isnan(v)
    if ok.any():
        pct = pd.Series(v[ok]).rank(method="average", pct=True).to_numpy()
        out[ok] = np.clip(np.ceil(pct * bins), 1, bins).astype(np.int64)
    return out


def rfm_churn_score(recency_days: ArrayLike, frequency: ArrayLike, bins: int = 5) -> np.ndarray:
    """A rule, fitted on nothing but quantiles: churn score in [0, 1] from recency and frequency scores.

    R = quantile score of minus recency (5 = bought most recently), F = quantile score of frequency; the
    score is 1 - (R + F - 2) / (2 (bins - 1)), so the most recent, most frequent members score 0 and the
    least recent, least frequent 1. Members who never bought (recency NaN) score 1.
    """
    rec = np.asarray(recency_days, dtype=float)
    freq = np.asarray(frequency, dtype=float)
    if rec.shape != freq.shape:
        raise ValueError(f"recency_days and frequency differ in shape: {rec.shape} vs {freq.shape}")
    bought = ~np.isnan(rec)
    r = quantile_scores(np.where(bought, -rec, np.nan), bins)
    f = quantile_scores(np.where(bought, freq, np.nan), bins)
    return rfm_churn_score_from_scores(r, f, bins)


def rfm_churn_score_from_scores(r_score: ArrayLike, f_score: ArrayLike, bins: int = 5) -> np.ndarray:
    """The same rule on precomputed scores (the ``rfm_r``/``rfm_f`` member features; 0 = no purchase)."""
    r = np.asarray(r_score, dtype=float)
    f = np.asarray(f_score, dtype=float)
    score = 1.0 - (r + f - 2.0) / (2.0 * (bins - 1))
    return np.where((r <= 0) | (f <= 0), 1.0, np.clip(score, 0.0, 1.0))


# --- next purchase: the member's own mean gap -------------------------------------------------------------


def mean_gap_days_to_next(gap_mean_days: ArrayLike, recency_days: ArrayLike,
                          fallback_gap_days: float | None = None) -> np.ndarray:
    """Days from the cutoff to the next purchase if the member keeps their own mean gap: gap - recency,
    floored at 0 (an overdue member is expected at once). Members with fewer than two orders (gap NaN) get
    ``fallback_gap_days - recency`` (e.g. the population's median gap), or NaN without a fallback;
    members who never bought get NaN."""
    gap = np.asarray(gap_mean_days, dtype=float)
    rec = np.asarray(recency_days, dtype=float)
    if gap.shape != rec.shape:
        raise ValueError(f"gap_mean_days and recency_days differ in shape: {gap.shape} vs {rec.shape}")
    if fallback_gap_days is not None:
        gap = np.where(np.isnan(gap), fallback_gap_days, gap)
    return np.maximum(gap - rec, 0.0)

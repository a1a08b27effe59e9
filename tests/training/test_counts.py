"""Pareto/NBD: likelihood, P(alive) and expectations against numerical integration of the model's
definition, the fitter against simulated data with known parameters, and the CDNOW 39-week holdout."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pytest
from scipy.integrate import quad
from scipy.special import gammaln

from features.contract import C
from training.baselines import BgNbd
from training.counts import ParetoNbd, ParetoNbdParams
from training.labels import L, split_calibration_holdout

# Fader & Hardie's Pareto/NBD on the CDNOW 1/10 sample (weeks)
PUBLISHED = {"r": 0.553, "alpha": 10.578, "s": 0.606, "beta": 11.669}
HISTORIES = [(0, 0.0, 38.86), (2, 30.43, 38.86), (2, 5.0, 38.86), (7, 38.86, 38.86), (25, 20.0, 32.0)]


def _model(**params: float) -> ParetoNbd:
    m = ParetoNbd()
    m.params_ = ParetoNbdParams(**params, log_likelihood=0.0, n_customers=0, converged=True)
    return m


def _by_quadrature(r: float, alpha: float, s: float, beta: float, x: int, t_x: float, t: float) -> tuple:
    """Likelihood and P(alive) from the model's definition: lambda integrated in closed form, the
    lifetime tau (Pareto II marginal: density s beta^s / (beta + tau)^(s+1)) numerically."""
    const = np.exp(gammaln(r + x) - gammaln(r) + r * np.log(alpha))
    alive = (beta / (beta + t)) ** s / (alpha + t) ** (r + x)
    dead, _ = quad(lambda tau: s * beta**s / (beta + tau) ** (s + 1) / (alpha + tau) ** (r + x), t_x, t,
                   epsabs=0, epsrel=1e-12)
    return const * (alive + dead), alive / (alive + dead)


@pytest.mark.parametrize("params", [PUBLISHED, {"r": 0.8, "alpha": 4.0, "s": 1.7, "beta": 20.0},
                                    {"r": 2.0, "alpha": 30.0, "s": 0.4, "beta": 3.0}])
def test_likelihood_and_p_alive_match_quadrature(params: dict) -> None:
    m = _model(**params)
    x, t_x, t = (np.array(v, dtype=float) for v in zip(*HISTORIES, strict=True))
    ll, pa = m.log_likelihood(x, t_x, t), m.p_alive(x, t_x, t)
    for i, (xi, txi, ti) in enumerate(HISTORIES):
        want_l, want_pa = _by_quadrature(**params, x=xi, t_x=txi, t=ti)
        assert ll[i] == pytest.approx(np.log(want_l), rel=1e-9)
        assert pa[i] == pytest.approx(want_pa, rel=1e-9)
    assert pa[3] > pa[2]  # the same two purchases, the last one long ago: less likely alive
    assert 0 < pa[0] < 1  # one-time buyers can have left (BG/NBD says 1)


@pytest.mark.parametrize("s", [0.606, 1.0, 2.5])
def test_expectations_match_quadrature(s: float) -> None:
    p = {**PUBLISHED, "s": s}
    m = _model(**p)
    r, alpha, beta = p["r"], p["alpha"], p["beta"]
    x, t_x, t = 2, 30.43, 38.86
    _, pa = _by_quadrature(**p, x=x, t_x=t_x, t=t)
    # alive at T: rate ~ Gamma(r + x, alpha + T), still alive at T + u with prob ((beta+T)/(beta+T+u))^s
    survive, _ = quad(lambda u: ((beta + t) / (beta + t + u)) ** s, 0, 39, epsrel=1e-12)
    got = m.expected_purchases(39, [x], [t_x], [t])[0]
    assert got == pytest.approx(pa * (r + x) / (alpha + t) * survive, rel=1e-9)
    new, _ = quad(lambda u: (beta / (beta + u)) ** s, 0, 39, epsrel=1e-12)
    assert m.expected_purchases_new([39.0])[0] == pytest.approx(r / alpha * new, rel=1e-9)
    assert m.expected_purchases(0, [x], [t_x], [t])[0] == 0.0


def _simulate(n: int, r: float, alpha: float, s: float, beta: float, holdout: float, seed: int) -> tuple:
    """Customers acquired over 12 weeks and observed to week 39 (T = 27..39), then a holdout of
    ``holdout`` weeks: the model's own generative process, in continuous time."""
    rng = np.random.default_rng(seed)
    lam, mu = rng.gamma(r, 1 / alpha, n), rng.gamma(s, 1 / beta, n)
    tau = rng.exponential(1 / mu)  # lifetime
    big_t = 39 - rng.uniform(0, 12, n)
    span = np.minimum(tau, big_t)
    x = rng.poisson(lam * span).astype(float)
    t_x = np.where(x > 0, span * rng.random(n) ** (1 / np.maximum(x, 1)), 0.0)  # max of x uniforms
    holdout_total = rng.poisson(lam * np.clip(np.minimum(tau, big_t + holdout) - big_t, 0, None)).sum()
    return x, t_x, big_t, int(holdout_total)


def test_expectations_at_the_true_parameters_match_a_simulated_population() -> None:
    truth = {"r": 0.55, "alpha": 10.0, "s": 0.6, "beta": 12.0}
    x, t_x, big_t, holdout_total = _simulate(200_000, **truth, holdout=39.0, seed=100)
    m = _model(**truth)
    # conditional: sum over customers of E[Y(39) | history] vs what the population did next
    assert m.expected_purchases(39, x, t_x, big_t).sum() == pytest.approx(holdout_total, rel=0.02)
    # unconditional: E[X(T)] of a new customer vs the calibration purchases
    assert m.expected_purchases_new(big_t).sum() == pytest.approx(x.sum(), rel=0.02)


def test_fit_recovers_parameters_and_predicts_the_simulated_holdout() -> None:
    truth = {"r": 0.55, "alpha": 10.0, "s": 0.6, "beta": 12.0}
    x, t_x, big_t, holdout_total = _simulate(12_000, **truth, holdout=39.0, seed=3)
    m = ParetoNbd().fit(x, t_x, big_t)
    p = m.params_
    assert p.converged and p.n_customers == 12_000
    assert p.r == pytest.approx(truth["r"], rel=0.15)
    assert p.alpha == pytest.approx(truth["alpha"], rel=0.15)
    # s and beta trade off on 39 weeks (only their ratio, the mean drop-out rate, is sharp)
    assert p.s == pytest.approx(truth["s"], rel=0.4)
    assert p.beta == pytest.approx(truth["beta"], rel=0.8)
    assert p.s / p.beta == pytest.approx(truth["s"] / truth["beta"], rel=0.25)
    assert p.log_likelihood == pytest.approx(m.log_likelihood(x, t_x, big_t).sum(), rel=1e-12)
    assert m.expected_purchases(39, x, t_x, big_t).sum() == pytest.approx(holdout_total, rel=0.06)
    truth_ll = _model(**truth).log_likelihood(x, t_x, big_t).sum()
    assert p.log_likelihood >= truth_ll  # the maximum is at least as high as the truth's


def test_errors() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        ParetoNbd().p_alive([0], [0], [1])
    with pytest.raises(ValueError, match="recency must not exceed T"):
        ParetoNbd().fit([0, 1], [0, 5], [4, 4])
    with pytest.raises(ValueError, match="at least one customer"):
        ParetoNbd().fit([], [], [])
    with pytest.raises(ValueError, match="penalizer"):
        ParetoNbd(penalizer=-1)
    with pytest.raises(ValueError, match="t must be >= 0"):
        _model(**PUBLISHED).expected_purchases(-1, [0], [0], [1])


@pytest.mark.realdata
def test_cdnow_39_week_holdout(shared_data) -> None:
    raw = pd.read_csv(shared_data / "cdnow" / "CDNOW_master.txt", sep=r"\s+",
                      dtype={"customer_id": str, "date": str})
    tx = pd.DataFrame({
        C.MEMBER_ID: raw["customer_id"], C.ORDER_ID: raw.index.astype(str),
        C.TS: pd.to_datetime(raw["date"], format="%Y%m%d").dt.tz_localize("UTC"),
        C.AMOUNT: raw["dollar_value"].astype(float),
    })
    s = split_calibration_holdout(tx, date(1997, 10, 1), date(1998, 6, 30), unit_days=7)
    x, t_x, t = s[L.FREQUENCY_CAL], s[L.RECENCY_CAL], s[L.T_CAL]
    m = ParetoNbd().fit(x, t_x, t)
    p = m.params_
    assert p.converged
    # whole cohort; the published 1/10 sample gives r 0.553, alpha 10.578, s 0.606, beta 11.669, LL -9,595
    assert (p.r, p.alpha, p.s, p.beta) == pytest.approx((0.5974, 11.586, 0.5222, 8.828), rel=5e-3)
    assert p.log_likelihood == pytest.approx(-95_415.1, abs=0.5)
    actual = s[L.FREQUENCY_HOLDOUT].sum()
    assert actual == 19_684
    pareto = m.expected_purchases(39, x, t_x, t).sum()
    bg = BgNbd().fit(x, t_x, t).expected_purchases(39, x, t_x, t).sum()
    assert pareto / actual - 1 == pytest.approx(-0.1286, abs=0.002)
    assert bg / actual - 1 == pytest.approx(-0.1428, abs=0.002)  # the reference: Pareto/NBD is closer

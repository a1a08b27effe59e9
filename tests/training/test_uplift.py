"""Uplift: the Qini curve on a hand-checked example; a T-learner finds a planted effect that only some
members have and beats random targeting; with no effect at all it does not."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.contract import C
from training.uplift import TLearner, evaluate_uplift, qini_coefficient, qini_curve, uplift_at


def test_qini_curve_by_hand() -> None:
    # ranked: T1 (bought), H1 (no), T0 (no), H0 (bought)
    score = np.array([0.9, 0.1, 0.5, 0.3])
    treated = np.array([True, False, False, True])
    outcome = np.array([1, 1, 0, 0])
    # k=1: 1 - 0; k=2: 1 - 0 * 1/1 = 1; k=3: 1 - 0 * 2/1 = 1; k=4: 1 - 1 * 2/2 = 0
    assert qini_curve(score, treated, outcome).tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert qini_coefficient(score, treated, outcome) == pytest.approx((0 + 1 + 1 + 1 + 0) / 5 / 4)
    assert uplift_at(score, treated, outcome, 0.5) == pytest.approx(1.0 - 0.0)
    assert np.isnan(uplift_at(score, treated, outcome, 0.25))  # only treated in the top row


def _world(n: int, effect: float, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, n)
    noise = rng.uniform(0, 1, n)
    treated = rng.random(n) < 0.8
    base = 0.15 + 0.2 * noise  # who buys anyway depends on another column
    p = base + effect * treated * (x > 0.7)  # the coupon works on the 30% with x above 0.7 only
    return pd.DataFrame({C.MEMBER_ID: [f"M{i}" for i in range(n)], C.ARM: np.where(treated, "treatment", "holdout"),
                         "x": x, "noise": noise, "repurchased": (rng.random(n) < p).astype(int)})


def test_t_learner_finds_the_planted_effect_and_beats_random() -> None:
    frame = _world(6000, effect=0.3, seed=1)
    r = evaluate_uplift(frame, ["x", "noise"], folds=4, permutations=100)
    assert r["beats_random"] and r["qini"] > 3 * r["random_qini_p95"]
    assert r["uplift_at"]["0.2"] > 0.2 > r["overall_uplift"]  # the top fifth is the responsive group
    top = np.argsort(-r["score"])[:1000]
    assert (frame["x"].to_numpy()[top] > 0.7).mean() > 0.8


def test_without_an_effect_the_model_does_not_beat_random() -> None:
    r = evaluate_uplift(_world(6000, effect=0.0, seed=2), ["x", "noise"], folds=4, permutations=100)
    assert not r["beats_random"]
    assert abs(r["overall_uplift"]) < 0.03


def test_an_arm_too_small_is_refused() -> None:
    frame = _world(300, effect=0.3, seed=3)
    frame[C.ARM] = "treatment"
    frame.loc[:9, C.ARM] = "holdout"
    with pytest.raises(ValueError, match="holdout arm has"):
        TLearner().fit(frame[["x"]], (frame[C.ARM] == "treatment").to_numpy(), frame["repurchased"].to_numpy())

"""The churn model: beats the RFM rule on a later cutoff, monotone in recency, plain-word reasons, and a
saved file that predicts the same and refuses to load when its state does not match."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.contract import C, F
from tests.conftest import make_settings
from training.baselines import rfm_churn_score_from_scores
from training.dataset import build_training_set, default_cutoffs
from training.labels import L
from training.metrics import roc_auc
from training.models import ChurnModel, ModelLoadError, _isotonic


def test_isotonic_pools_adjacent_violators() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0, 4.0])
    y = np.array([0.0, 1.0, 0.0, 1.0, 1.0])
    knots, fitted = _isotonic(x, y)
    assert knots.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert fitted.tolist() == [0.0, 0.5, 0.5, 1.0]


def test_band_uses_the_thresholds_in_the_model() -> None:
    m = ChurnModel(bands=[("low", 0.0), ("medium", 0.25), ("high", 0.5)])
    assert m.band([0.0, 0.2499, 0.25, 0.49, 0.5, 1.0]).tolist() == ["low", "low", "medium", "medium", "high",
                                                                       "high"]
    with pytest.raises(ValueError, match="increasing order"):
        ChurnModel(bands=[("a", 0.5), ("b", 0.2)])


@pytest.fixture(scope="module")
def folds(demo_workspace) -> tuple:
    """Three cutoffs 28 days apart: train on the first, stop early and calibrate on the second, test on the
    third; and the model fitted that way."""
    settings, _ = demo_workspace
    frame = build_training_set(settings, default_cutoffs(settings, n=3, every_days=28))
    cuts = sorted(frame[C.EVENT_TIMESTAMP].unique())
    train, valid, test = (frame[frame[C.EVENT_TIMESTAMP] == c] for c in cuts)
    model = ChurnModel(settings=settings, num_threads=2).fit(train, valid)
    return settings, train, valid, test, model


@pytest.mark.slow
def test_beats_the_rfm_rule_on_a_later_cutoff(folds) -> None:
    _, _, _, test, model = folds
    y = test[L.CHURN].to_numpy()
    auc = roc_auc(y, model.predict_proba(test))
    rfm = roc_auc(y, rfm_churn_score_from_scores(test[F.RFM_R], test[F.RFM_F]))
    # observed on the 1,200-member demo: model ~0.95-0.96, RFM rule ~0.91
    assert auc >= 0.90
    assert auc >= rfm + 0.02
    p = model.predict_proba(test)
    assert ((p > 0) & (p < 1)).all()
    # calibrated on the validation fold: the mean prediction is near the observed rate of the later cutoff
    assert abs(p.mean() - y.mean()) < 0.05


@pytest.mark.slow
def test_longer_recency_never_lowers_risk(folds) -> None:
    _, _, _, test, model = folds
    rows = test[test[F.GAP_MEAN_DAYS].notna()].head(200)
    grids = ((F.RECENCY_GAP_RATIO, np.linspace(0, 12, 25)), (F.RECENCY_DAYS, np.linspace(0, 700, 29)))
    for col, grid in grids:
        preds = []
        for v in grid:
            varied = rows.copy()
            varied[col] = v  # only this column changes
            preds.append(model.predict_proba(varied))
        steps = np.diff(np.vstack(preds), axis=0)
        assert (steps >= -1e-12).all(), col
        assert (np.vstack(preds)[-1] > np.vstack(preds)[0]).mean() > 0.3, col  # and it does move


@pytest.mark.slow
def test_reasons_name_risk_raising_features_with_their_values(folds) -> None:
    _, _, _, test, model = folds
    risky = test.sort_values(F.RECENCY_GAP_RATIO, ascending=False).head(20)
    reasons = model.reasons(risky, top=3)
    assert len(reasons) == 20 and all(1 <= len(r) <= 3 for r in reasons)
    p = model.predict_proba(risky)
    assert (model.band(p) == "high").mean() > 0.8
    first = reasons[0]
    row = risky.iloc[0]
    assert any(f"no purchase for {row[F.RECENCY_DAYS]:.0f} days" in r for r in first), first
    # the most frequent recent buyers are low risk
    safe = test.sort_values(F.orders(90), ascending=False).head(20)
    assert (model.band(model.predict_proba(safe)) == "low").mean() > 0.8
    contrib = model.booster.predict(model._array(risky), pred_contrib=True, num_threads=1)[:, :-1]
    assert all(len(r) <= int((c > 0).sum()) for r, c in zip(reasons, contrib, strict=True))


@pytest.mark.slow
def test_save_load_round_trip_and_checks(folds, tmp_path: Path) -> None:
    settings, _, _, test, model = folds
    path = model.save(tmp_path / "churn.json")
    loaded = ChurnModel.load(path, settings=settings)
    assert loaded.features == model.features and loaded.categories == model.categories
    np.testing.assert_array_equal(loaded.predict_proba(test), model.predict_proba(test))
    # the fast float-matrix path gives what LightGBM gives on the pandas categorical frame it was trained on
    via_pandas = model.booster.predict(model._matrix(test), num_threads=1)
    np.testing.assert_allclose(loaded.predict_raw(test), via_pandas, rtol=1e-12)
    assert loaded.reasons(test.head(10)) == model.reasons(test.head(10))
    # unseen category values and columns in another order are handled by name
    shuffled = test[list(reversed(test.columns))].copy()
    shuffled[F.CHANNEL] = shuffled[F.CHANNEL].where(shuffled.index % 2 == 0, "carrier-pigeon")
    assert np.isfinite(loaded.predict_proba(shuffled)).all()

    state = json.loads(path.read_text())
    state["features"][0], state["features"][1] = state["features"][1], state["features"][0]
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(state))
    with pytest.raises(ModelLoadError, match=r"feature order differs .* position 0"):
        ChurnModel.load(tampered)

    state = json.loads(path.read_text())
    state["versions"]["lightgbm"] = "0.0.1"
    (tmp_path / "old.json").write_text(json.dumps(state))
    with pytest.raises(ModelLoadError, match=r"lightgbm 0\.0\.1"):
        ChurnModel.load(tmp_path / "old.json")

    other = make_settings(tmp_path / "other", lifecycle={"dormant_days": 60})
    with pytest.raises(ModelLoadError, match="settings fingerprint differs"):
        ChurnModel.load(path, settings=other)


@pytest.mark.slow
def test_fit_refuses_a_validation_fold_that_is_not_later(folds) -> None:
    _, train, valid, _, _ = folds
    with pytest.raises(ValueError, match="must be later"):
        ChurnModel().fit(valid, train)
    broken = valid.copy()
    broken[L.CHURN] = pd.array([pd.NA] * len(broken), dtype="Int8")
    with pytest.raises(ValueError, match="column 'churn' is missing"):
        ChurnModel(num_boost_round=5).fit(train, broken)

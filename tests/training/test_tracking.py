"""MLflow tracking and the promotion gate, on a temporary SQLite store and artifact root."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from features.contract import C, F
from features.settings import PROJECT_ROOT, MlflowSettings
from training.dataset import build_training_set, data_fingerprint, default_cutoffs
from training.models import ChurnModel
from training.tracking import (
    CHALLENGER,
    CHAMPION,
    PromotionError,
    champion_at,
    champion_history,
    churn_metrics,
    client,
    log_churn_run,
    promote,
    rollback,
)


def test_churn_metrics_by_hand() -> None:
    y = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    p = np.array([0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.9, 0.6])
    m = churn_metrics(y, p)
    assert m["auc"] == 1.0
    assert m["lift_decile1"] == pytest.approx(1.0 / 0.2)  # top row is a positive; base rate 0.2
    assert m["brier"] == pytest.approx(np.mean((p - y) ** 2))


@pytest.fixture(scope="module")
def setup(demo_workspace, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    settings, _ = demo_workspace
    tmp = tmp_path_factory.mktemp("mlflow")
    tracked = settings.model_copy(update={"mlflow": MlflowSettings(
        tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", artifact_root=tmp / "artifacts")})
    frame = build_training_set(settings, default_cutoffs(settings, n=4, every_days=28))
    cuts = sorted(frame[C.EVENT_TIMESTAMP].unique())
    train, valid, test, later = (frame[frame[C.EVENT_TIMESTAMP] == c] for c in cuts)
    good = ChurnModel(settings=settings, num_boost_round=60, num_threads=2).fit(train, valid)
    worse = ChurnModel(settings=settings, features=[F.CHANNEL, F.N_CATEGORIES], num_boost_round=10,
                       num_threads=2).fit(train, valid)
    return tracked, tmp, train, test, later, good, worse


@pytest.mark.slow
def test_promotion_gate_rollback_and_history(setup) -> None:
    mlruns_before = sorted(p.name for p in (PROJECT_ROOT / "mlruns").glob("*"))
    tracked, tmp, train, test, later, good, worse = setup
    mlc = client(tracked)

    with pytest.raises(PromotionError, match="no 'challenger'"):
        promote(tracked, "churn_gate")

    r1 = log_churn_run(tracked, worse, train, test, name="churn_gate")
    first = promote(tracked, "churn_gate", "auc")
    assert first.promoted and first.champion is None and first.reason == "no champion yet"
    assert str(mlc.get_model_version_by_alias("churn_gate", CHAMPION).version) == r1.version

    r2 = log_churn_run(tracked, good, train, test, name="churn_gate")
    assert r2.metrics["auc"] > r1.metrics["auc"] + 0.1
    better = promote(tracked, "churn_gate", "auc")
    assert better.promoted and (better.champion, better.challenger) == (r1.version, r2.version)
    assert better.champion_value == pytest.approx(r1.metrics["auc"], rel=1e-9)
    assert f"v{r2.version}" in better.summary() and "promoted" in better.summary()

    r3 = log_churn_run(tracked, worse, train, test, name="churn_gate")  # deliberately worse
    refused = promote(tracked, "churn_gate", "auc")
    assert not refused.promoted and "not better" in refused.reason
    assert str(mlc.get_model_version_by_alias("churn_gate", CHAMPION).version) == r2.version
    assert str(mlc.get_model_version_by_alias("churn_gate", CHALLENGER).version) == r3.version
    # lower-is-better metrics are compared the right way round
    assert not promote(tracked, "churn_gate", "log_loss").promoted

    # the same model on another backtest is not comparable
    log_churn_run(tracked, good, train, later, name="churn_gate")
    other = promote(tracked, "churn_gate", "auc")
    assert not other.promoted and "not the same backtest" in other.reason

    assert rollback(tracked, "churn_gate") == r1.version
    assert str(mlc.get_model_version_by_alias("churn_gate", CHAMPION).version) == r1.version
    with pytest.raises(PromotionError, match="no previous champion"):
        rollback(tracked, "churn_gate")

    history = champion_history(tracked, "churn_gate")
    assert [(e["action"], e["version"], e["previous"]) for e in history] == [
        ("promote", r1.version, None), ("promote", r2.version, r1.version),
        ("rollback", r1.version, r2.version)]
    assert champion_at(tracked, history[1]["at"], "churn_gate") == r2.version
    assert champion_at(tracked, history[2]["at"], "churn_gate") == r1.version
    assert champion_at(tracked, "2000-01-01", "churn_gate") is None

    # nothing went to the project's own mlruns/
    assert sorted(p.name for p in (PROJECT_ROOT / "mlruns").glob("*")) == mlruns_before
    assert any((tmp / "artifacts").rglob("model.json"))


@pytest.mark.slow
def test_run_lineage_and_pyfunc_model(setup) -> None:
    import mlflow

    tracked, _, train, test, _, good, _ = setup
    run = log_churn_run(tracked, good, train, test, name="churn_lineage")
    mlc = client(tracked)
    logged = mlc.get_run(run.run_id).data
    assert set(logged.metrics) == {"auc", "log_loss", "brier", "lift_decile1", "mean_predicted", "observed_rate",
                                   "rows"}
    assert logged.metrics["auc"] == pytest.approx(run.metrics["auc"]) and run.metrics["auc"] > 0.9
    assert logged.tags["data_fingerprint"] == data_fingerprint(train) == run.data_fingerprint
    assert logged.tags["feature_service"] == "churn_v1"
    assert logged.tags["backtest.cutoff"] == str(test[C.EVENT_TIMESTAMP].iloc[0].date())
    code = logged.tags["code_version"]
    assert len(code.split("-")[0]) == 40 or code == "unknown"
    assert logged.params["service"] == "churn_v1" and int(logged.params["train_rows"]) == len(train)
    assert str(mlc.get_model_version_by_alias("churn_lineage", CHALLENGER).version) == run.version

    mlflow.set_tracking_uri(tracked.tracking_uri)
    pyfunc = mlflow.pyfunc.load_model(f"models:/churn_lineage@{CHALLENGER}")
    assert pyfunc.metadata.signature is not None
    # the signature declares numeric features as doubles (Feast turns integers with a gap into floats)
    rows = test[good.features].head(50).astype({f: float for f in good.features if f not in good.categories})
    np.testing.assert_allclose(pyfunc.predict(rows), good.predict_proba(test.head(50)))
    reqs = Path(mlflow.pyfunc.get_model_dependencies(f"models:/churn_lineage@{CHALLENGER}")).read_text()
    assert "lightgbm==" in reqs and "pandas==" in reqs  # explicit pins, not inferred

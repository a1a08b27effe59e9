"""On demo data the models recover the planted truth (features/synthetic.py): churn risk against the true
hazard, next-purchase intervals that cover what they claim, replenishment cycles and reminders."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd
import pytest

from features.contract import FC, C
from features.synthetic import TRUTH_DIR, T
from training.backtest import run_backtest
from training.labels import L
from training.metrics import roc_auc
from training.next_purchase import NP

pytestmark = pytest.mark.slow


TRUTH_MEMBERS = 8_000
"""Large enough for LightGBM to learn what BG/NBD's four parameters get from a few hundred members."""


def _truth(settings, name: str) -> pd.DataFrame:
    return pd.read_parquet(settings.dirs.raw / "demo" / TRUTH_DIR / f"{name}.parquet")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    """A demo of TRUTH_MEMBERS members with snapshots only at the cutoffs the backtests below need."""
    from features.ingest import ingest, sources_from_dir
    from features.store import apply
    from pipelines.demo import generate_raw
    from tests.conftest import make_settings
    from training.backtest import ensure_snapshots, training_cutoffs
    from training.dataset import last_data_day

    s = make_settings(tmp_path_factory.mktemp("truth") / "home")
    generate_raw(s, members=TRUTH_MEMBERS)
    ingest(sources_from_dir(s.dirs.raw / "demo", "demo"), "demo", s)
    end = last_data_day(s) + timedelta(days=1)
    cutoffs = {"churn": end - timedelta(days=91), "next_purchase": end - timedelta(days=365)}
    ensure_snapshots(s, sorted({d for kind, c in cutoffs.items() for d in [c, *training_cutoffs(s, kind, c)]}))
    apply(s)
    return s, cutoffs


def oracle_no_purchase(truth: pd.DataFrame, cutoff: pd.Timestamp, horizon_days: int) -> pd.Series:
    """P(no purchase in [cutoff, cutoff + H)) knowing what no model can see: whether the member is still
    active at the cutoff, their purchase rate and their dropout hazard (seasonality ignored)."""
    mu = truth[T.EXPECTED_RATE].to_numpy(dtype=float)
    lam = truth[T.HAZARD].to_numpy(dtype=float)
    k = (lam + mu) * horizon_days
    alive_none = lam / np.maximum(lam + mu, 1e-12) * (1 - np.exp(-k)) + np.exp(-k)
    gone = (truth[T.DROPOUT_AT] <= cutoff).to_numpy() | truth[T.NEVER_BUYS].to_numpy()
    return pd.Series(np.where(gone, 1.0, alive_none), index=truth[T.MEMBER_ID].to_numpy())


@pytest.fixture(scope="module")
def churn_backtest(workspace):
    settings, cutoffs = workspace
    return run_backtest(settings, "churn", cutoffs["churn"], tune_params=False, with_figures=False)


def test_churn_model_comes_close_to_the_oracle(churn_backtest, workspace) -> None:
    settings, _ = workspace
    r = churn_backtest
    test = r.test_frame
    oracle = oracle_no_purchase(_truth(settings, "members"), pd.Timestamp(r.cutoff, tz="UTC"), r.horizon_days)
    y = test[L.CHURN].to_numpy(dtype=float)
    oracle_auc = roc_auc(y, oracle.reindex(test[C.MEMBER_ID]).to_numpy())
    model_auc = r.metrics["model"]["auc"]
    print(f"churn AUC: model {model_auc:.4f}, oracle {oracle_auc:.4f}, bg_nbd {r.metrics['bg_nbd']['auc']:.4f}")
    assert oracle_auc > 0.8
    assert model_auc >= 0.9 * oracle_auc
    # the demo's buyers are BG/NBD-like by construction, so BG/NBD is a strong baseline here
    assert model_auc > r.metrics["bg_nbd"]["auc"] - 0.01 and model_auc > r.metrics["rfm_rule"]["auc"]
    # calibrated: the mean predicted risk matches the observed churn rate
    assert r.metrics["model"]["mean_predicted"] == pytest.approx(r.metrics["model"]["observed_rate"], abs=0.05)


@pytest.fixture(scope="module")
def next_backtest(workspace):
    settings, cutoffs = workspace
    # a cutoff followed up for a whole year: every interval's outcome is known, so coverage is unbiased
    return run_backtest(settings, "next_purchase", cutoffs["next_purchase"], tune_params=False,
                        with_figures=False)


def test_next_purchase_intervals_cover_what_they_claim(next_backtest, workspace) -> None:
    settings, _ = workspace
    m = next_backtest.metrics["model"]
    print(f"coverage of the {settings.training.interval:.0%} interval: {m['coverage']:.3f} "
          f"on {m['coverage_rows']:.0f} rows; c-index {m['c_index']:.3f}")
    assert m["coverage"] == pytest.approx(settings.training.interval, abs=0.08)
    assert m["c_index"] > next_backtest.metrics["mean_gap"]["c_index"]


def test_replenishment_cycles_and_reminders(next_backtest, workspace) -> None:
    settings, _ = workspace
    r = next_backtest
    assert "category" in r.models, "the demo has replenishable categories: a per-category model is fitted"
    from training.dataset import build_category_training_set

    test = build_category_training_set(settings, [r.cutoff])
    pred = r.models["category"].predict(test)
    truth = _truth(settings, "replenishment").set_index([T.MEMBER_ID, T.CATEGORY])[T.CYCLE_DAYS]
    keys = pd.MultiIndex.from_arrays([test[C.MEMBER_ID], test[C.CATEGORY]])
    cycle = truth.reindex(keys).to_numpy(dtype=float)
    rec = test[FC.CAT_RECENCY_DAYS].to_numpy(dtype=float)
    # members who replenish the category, observed for at least two cycles, and not yet due
    on_cycle = ~np.isnan(cycle) & (test[FC.CAT_ORDERS].to_numpy() >= 3) & (rec < cycle)
    assert on_cycle.sum() >= 30
    implied = rec[on_cycle] + pred[NP.EXPECTED_DAYS].to_numpy(dtype=float)[on_cycle]
    ratio = implied / cycle[on_cycle]
    print(f"implied / true cycle: median {np.nanmedian(ratio):.3f} over {on_cycle.sum()} pairs")
    assert np.nanmedian(np.abs(ratio - 1)) < 0.15
    # the reminder goes out before the cycle ends
    remind_at = rec[on_cycle] + pred[NP.REMIND_DAYS].to_numpy(dtype=float)[on_cycle]
    assert np.mean(remind_at < cycle[on_cycle]) > 0.9

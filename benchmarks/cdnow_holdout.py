"""Benchmark: CDNOW holdout repeat purchases, BG/NBD against other honest count models.

    uv run python benchmarks/cdnow_holdout.py [--data PATH] [--no-panel] [--json]

Reads ``CDNOW_master.txt`` in place (default ``../shared/data/cdnow/CDNOW_master.txt`` next to the
repository) into the contract's transaction columns (``features.contract.C``), and for two splits made by
``training.labels.split_calibration_holdout`` (purchases counted per day, times in weeks):

- ``validation``: calibration 1997-01-01..1997-07-01 (26 weeks), holdout 1997-07-02..1997-09-30 (13 weeks),
  entirely before 1997-10-01; the only place a method can be chosen without touching the holdout;
- ``holdout``: calibration 1997-01-01..1997-09-30 (39 weeks), holdout 1997-10-01..1998-06-30 (39 weeks),
  the issue's figure,

fits every method on the calibration period only and predicts the total of the holdout's repeat
purchases. Methods: BG/NBD (``training.baselines.BgNbd``, the reference), BG/NBD with a penalizer, BG/NBD
fitted per acquisition-week sub-cohort, MBG/NBD (Batislam, Denizel & Filiztekin 2007; defined here), the
Pareto/NBD (``training.counts.ParetoNbd``), the naive run rate of the last 8 calibration weeks, and (unless
``--no-panel``) a weekly member x week LightGBM Poisson panel rolled forward by simulation (defined here; a
few minutes on one thread). Prints a table; ``--json`` adds one JSON object as the last line.
See docs/cdnow-holdout.md for the figures and what they mean.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import betaln, gammaln, hyp2f1

ROOT = Path(__file__).resolve().parents[1]
# the script's own folder holds benchmarks/feature_computation.py, which would shadow the features package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

from features.contract import C  # noqa: E402
from training.baselines import BgNbd  # noqa: E402
from training.counts import ParetoNbd  # noqa: E402
from training.labels import L, split_calibration_holdout  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cdnow" / "CDNOW_master.txt"
START = date(1997, 1, 1)
SPLITS = {  # name: (cutoff = first holdout day, last holdout day)
    "validation": (date(1997, 7, 2), date(1997, 9, 30)),
    "holdout": (date(1997, 10, 1), date(1998, 6, 30)),
}
RUN_RATE_WEEKS = 8
PANEL_SIMULATIONS = 2
PANEL_SEED = 0


# --- data ---------------------------------------------------------------------------------------------------


def read_cdnow(path: Path) -> pd.DataFrame:
    """The master file as contract transactions: one line = one order (``order_id`` = line number)."""
    raw = pd.read_csv(path, sep=r"\s+", dtype={"customer_id": str, "date": str})
    expected = ["customer_id", "date", "number_of_cds", "dollar_value"]
    if list(raw.columns) != expected:
        raise SystemExit(f"{path}: expected columns {expected}, found {list(raw.columns)}")
    return pd.DataFrame({
        C.MEMBER_ID: raw["customer_id"],
        C.ORDER_ID: raw.index.astype(str),
        C.TS: pd.to_datetime(raw["date"], format="%Y%m%d").dt.tz_localize("UTC"),
        C.QUANTITY: raw["number_of_cds"].astype(float),
        C.AMOUNT: raw["dollar_value"].astype(float),
    })


# --- MBG/NBD (a BG/NBD variant that also lets customers drop out at their first purchase) ------------------


class MbgNbd:
    """MBG/NBD (Batislam et al. 2007) by maximum likelihood; the formulas of lifetimes'
    ModifiedBetaGeoFitter. Kept in the benchmark: it is not better than BG/NBD on CDNOW."""

    def fit(self, x: np.ndarray, t_x: np.ndarray, t: np.ndarray) -> MbgNbd:
        uniq, w = np.unique(np.column_stack([x, t_x, t]), axis=0, return_counts=True)
        ux, utx, ut = uniq.T

        def objective(theta: np.ndarray) -> float:
            v = -float(np.dot(w, self._ll(np.exp(theta), ux, utx, ut))) / w.sum()
            return v if np.isfinite(v) else 1e10

        res = minimize(objective, np.log([1.0, max(float(np.median(t)), 1e-9) / 10, 1.0, 1.0]),
                       method="L-BFGS-B")
        if not res.success:
            res = minimize(objective, res.x, method="Nelder-Mead", options={"maxiter": 20000})
        self.params = np.exp(res.x)
        return self

    @staticmethod
    def _ll(p: np.ndarray, x: np.ndarray, t_x: np.ndarray, t: np.ndarray) -> np.ndarray:
        r, alpha, a, b = p
        a1 = gammaln(r + x) - gammaln(r) + r * np.log(alpha)
        a2 = betaln(a, b + x + 1) - betaln(a, b)
        a3 = -(r + x) * np.log(alpha + t)
        a4 = np.log(a) - np.log(b + x) + (r + x) * (np.log(alpha + t) - np.log(alpha + t_x))
        return a1 + a2 + a3 + np.logaddexp(a4, 0.0)

    def expected_purchases(self, h: float, x: np.ndarray, t_x: np.ndarray, t: np.ndarray) -> np.ndarray:
        r, alpha, a, b = self.params
        hyp = hyp2f1(r + x, b + x + 1, a + b + x, h / (alpha + t + h))
        num = (a + b + x) / (a - 1) * (1 - ((alpha + t) / (alpha + t + h)) ** (r + x) * hyp)
        return num / (1 + a / (b + x) * ((alpha + t) / (alpha + t_x)) ** (r + x))


# --- weekly member x week panel: LightGBM Poisson on state features, simulated forward -------------------


class _Panel:
    """Weekly repeat purchase days per member, weeks aligned so that the cutoff starts a week."""

    def __init__(self, tx: pd.DataFrame, cutoff: date, weeks_ahead: int) -> None:
        day = ((tx[C.TS].dt.tz_convert("UTC").dt.tz_localize(None) - pd.Timestamp(START)).dt.days).to_numpy()
        daily = pd.DataFrame({"m": tx[C.MEMBER_ID].to_numpy(), "day": day, "amount": tx[C.AMOUNT].to_numpy(),
                              "units": tx[C.QUANTITY].to_numpy()})
        daily = daily.groupby(["m", "day"], as_index=False, sort=True)[["amount", "units"]].sum()
        cut_day = (pd.Timestamp(cutoff) - pd.Timestamp(START)).days
        daily = daily[daily["day"] < cut_day + 7 * weeks_ahead]
        cal = daily[daily["day"] < cut_day]
        ids = np.unique(cal["m"])
        daily = daily[daily["m"].isin(ids)]
        daily["i"] = np.searchsorted(ids, daily["m"])
        first = cal.groupby("m").first().reindex(ids)
        self.n = len(ids)
        self.first_day = first["day"].to_numpy(float)
        self.static = np.column_stack([first["amount"].to_numpy(float), first["units"].to_numpy(float)])
        self.offset = -int(np.floor(-cut_day / 7))  # calibration weeks before the cutoff (the first may be partial)
        self.cut_week = self.offset  # index of the first holdout week
        self.origin = cut_day - 7 * self.offset  # day starting week 0
        self.weeks_ahead = weeks_ahead
        week = (daily["day"].to_numpy() - self.origin) // 7
        repeat = daily["day"].to_numpy() > self.first_day[daily["i"].to_numpy()]
        self.counts = np.zeros((self.n, self.offset + weeks_ahead), dtype=np.int16)
        np.add.at(self.counts, (daily["i"].to_numpy()[repeat], week[repeat]), 1)
        self._cal_days = (daily["i"].to_numpy()[daily["day"].to_numpy() < cut_day],
                          daily["day"].to_numpy()[daily["day"].to_numpy() < cut_day])

    def last_day_before(self, week: int) -> np.ndarray:
        i, d = self._cal_days
        keep = d < self.origin + 7 * week
        out = np.full(self.n, np.nan)
        np.fmax.at(out, i[keep], d[keep].astype(float))
        return out

    def features(self, counts: np.ndarray, last_day: np.ndarray, first_day: np.ndarray, static: np.ndarray,
                 week: int, calendar_week: float) -> np.ndarray:
        start = self.origin + 7 * week
        return np.column_stack([
            (start - first_day) / 7,  # tenure in weeks
            (start - last_day) / 7,  # weeks since the last purchase
            counts[:, :week].sum(axis=1),  # repeat purchase days so far
            counts[:, max(0, week - 4):week].sum(axis=1),
            counts[:, max(0, week - 13):week].sum(axis=1),
            static,
            np.full(len(first_day), calendar_week),
        ])


def panel_poisson(tx: pd.DataFrame, cutoff: date, weeks_ahead: int, seed: int = PANEL_SEED,
                  simulations: int = PANEL_SIMULATIONS) -> float:
    """Expected holdout repeat purchases of a member x week LightGBM Poisson model.

    Trained on the calibration weeks only: one row per member and week after their first purchase week,
    target = repeat purchase days in the week, features = tenure, weeks since the last purchase, repeat
    purchase days so far / in the last 4 / 13 weeks, first-day amount and CDs, and the calendar week (so
    that calendar effects inside the calibration period do not load onto the state features). Rolled
    forward week by week by simulation; the calendar week is unknown in the future, so each week's rate is
    the model's rate averaged over the post-acquisition calibration weeks (calendar effects as on average
    in calibration, no seasonality).
    """
    import lightgbm as lgb

    p = _Panel(tx, cutoff, weeks_ahead)
    first_week = (p.first_day - p.origin) // 7
    xs, ys = [], []
    for w in range(1, p.cut_week):
        ok = first_week < w
        if ok.any():
            f = p.features(p.counts, p.last_day_before(w), p.first_day, p.static, w, w)
            xs.append(f[ok])
            ys.append(p.counts[ok, w])
    model = lgb.LGBMRegressor(objective="poisson", num_threads=1, verbose=-1, n_estimators=300,
                              learning_rate=0.05, num_leaves=15, min_child_samples=200, reg_lambda=5.0,
                              subsample=0.8, subsample_freq=1, random_state=seed)
    model.fit(np.vstack(xs), np.concatenate(ys))
    post_acquisition = int(first_week.max()) + 1
    calendar = list(range(post_acquisition, p.cut_week, 3))

    rng = np.random.default_rng(seed)
    k = simulations
    counts = np.zeros((p.n * k, p.cut_week + weeks_ahead), dtype=np.int16)
    counts[:, :p.cut_week] = np.tile(p.counts[:, :p.cut_week], (k, 1))
    last = np.tile(p.last_day_before(p.cut_week), k)
    first_day, static = np.tile(p.first_day, k), np.tile(p.static, (k, 1))
    for w in range(p.cut_week, p.cut_week + weeks_ahead):
        f = p.features(counts, last, first_day, static, w, 0)
        rate = np.zeros(len(f))
        for c in calendar:
            f[:, -1] = c
            rate += model.predict(f)
        n = np.minimum(rng.poisson(rate / len(calendar)), 7)
        counts[:, w] = n
        bought = n > 0
        last[bought] = p.origin + 7 * w + rng.integers(0, 7, int(bought.sum()))
    return float(counts[:, p.cut_week:].sum()) / k


# --- the run ---------------------------------------------------------------------------------------------------


def run_rate(tx: pd.DataFrame, members: pd.Index, cutoff: date, horizon_weeks: float,
             weeks: int = RUN_RATE_WEEKS) -> float:
    """Repeat purchase days of ``members`` in the last ``weeks`` calibration weeks, scaled to the holdout."""
    day = tx[C.TS].dt.tz_convert("UTC").dt.tz_localize(None).dt.normalize()
    d = pd.DataFrame({"m": tx[C.MEMBER_ID], "day": day}).drop_duplicates()
    d = d[d["m"].isin(members)]
    first = d.groupby("m")["day"].transform("min")
    cut = pd.Timestamp(cutoff)
    recent = d[(d["day"] > first) & (d["day"] >= cut - pd.Timedelta(weeks=weeks)) & (d["day"] < cut)]
    return len(recent) * horizon_weeks / weeks


def evaluate(tx: pd.DataFrame, cutoff: date, end: date, panel: bool) -> dict:
    s = split_calibration_holdout(tx, cutoff, end, unit_days=7)
    x, t_x, t = (s[c].to_numpy(float) for c in (L.FREQUENCY_CAL, L.RECENCY_CAL, L.T_CAL))
    h = float(s[L.DURATION_HOLDOUT].iloc[0])
    actual = int(s[L.FREQUENCY_HOLDOUT].sum())
    acq_week = np.floor(t.max() - t + 1e-9).astype(int)

    def bg_cohorts() -> float:
        total = 0.0
        for g in np.unique(acq_week):
            k = acq_week == g
            total += BgNbd().fit(x[k], t_x[k], t[k]).expected_purchases(h, x[k], t_x[k], t[k]).sum()
        return total

    methods: dict[str, Callable[[], float]] = {
        "BG/NBD (reference)": lambda: BgNbd().fit(x, t_x, t).expected_purchases(h, x, t_x, t).sum(),
        "BG/NBD, penalizer 0.001": lambda: BgNbd(penalizer=0.001).fit(x, t_x, t)
        .expected_purchases(h, x, t_x, t).sum(),
        "BG/NBD per acquisition week": bg_cohorts,
        "MBG/NBD": lambda: MbgNbd().fit(x, t_x, t).expected_purchases(h, x, t_x, t).sum(),
        "Pareto/NBD": lambda: ParetoNbd().fit(x, t_x, t).expected_purchases(h, x, t_x, t).sum(),
        f"run rate, last {RUN_RATE_WEEKS} weeks": lambda: run_rate(tx, s.index, cutoff, h),
    }
    if panel:
        methods["weekly panel, LightGBM Poisson"] = lambda: panel_poisson(tx, cutoff, round(h))
    out = {"calibration": f"{START}..{cutoff - pd.Timedelta(days=1):%Y-%m-%d}", "holdout": f"{cutoff}..{end}",
           "weeks": round(h, 3), "members": len(s), "calibration_repeat_purchases": int(x.sum()),
           "actual": actual, "methods": {}}
    for name, fn in methods.items():
        t0 = time.perf_counter()
        predicted = float(fn())
        out["methods"][name] = {"predicted": round(predicted, 1),
                                "error_pct": round(100 * (predicted / actual - 1), 2),
                                "fit_seconds": round(time.perf_counter() - t0, 2)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"CDNOW_master.txt (default {DEFAULT_DATA})")
    ap.add_argument("--no-panel", action="store_true", help="skip the LightGBM panel (minutes on one thread)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)
    if not args.data.is_file():
        print(f"error: CDNOW file {args.data} not found; pass --data PATH/CDNOW_master.txt "
              f"(the shared data folder ../shared/data is not in the repository)", file=sys.stderr)
        return 2
    tx = read_cdnow(args.data)
    result = {"data": str(args.data), "unit": "weeks; purchases counted per day (several orders on a day = 1)",
              "splits": {}}
    for name, (cutoff, end) in SPLITS.items():
        r = evaluate(tx, cutoff, end, panel=not args.no_panel)
        result["splits"][name] = r
        print(f"\n{name}: calibration {r['calibration']}, holdout {r['holdout']} ({r['weeks']} weeks), "
              f"{r['members']} members; actual holdout repeat purchases {r['actual']}")
        print(f"  {'method':34s} {'predicted':>10s} {'error':>8s} {'seconds':>8s}")
        for m, v in r["methods"].items():
            print(f"  {m:34s} {v['predicted']:10.0f} {v['error_pct']:+7.2f}% {v['fit_seconds']:8.2f}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

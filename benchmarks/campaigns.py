"""Benchmark (accuracy): campaign effect and coupon uplift on the demo's planted campaigns.

    uv run python benchmarks/campaigns.py [--members 20000] [--home DIR] [--window 7] [--json]

Workspace: ``--home``, else the demo of ``--members`` members under /tmp/bench-campaigns/home-<members>
(``repurchase demo``, made once and reused). The demo plants six coupon campaigns with a 20% random holdout
and keeps the realised truth (``raw/demo/truth/campaign_effects.parquet``: the treatment arm's repurchase
rate with and without its coupon orders).

Measured, each beside its reference in the same run:

- ``training.campaigns.campaign_effects`` (what ``repurchase campaigns report`` prints): per campaign and
  pooled, at 7/14/30 days, whether the planted uplift lies inside the 95% interval of the lift, and the
  lift / truth ratio;
- ``training.uplift.evaluate_uplift`` (``repurchase campaigns uplift``): the cross-fitted T-learner's Qini
  coefficient beside random targeting's (the same rows ranked at random 200 times: mean and 95th
  percentile), and uplift@10/20/30% beside the overall uplift.

Goals (issue 6): the report recovers the planted effect within its interval; the uplift model's Qini beats
random targeting. Writes benchmarks/results/campaigns.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "campaigns.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--members", type=int, default=20_000)
    ap.add_argument("--home", type=Path)
    ap.add_argument("--window", type=int, default=7, help="uplift window (days)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    home = args.home or Path(f"/tmp/bench-campaigns/home-{args.members}")
    if args.home is None and not (home / ".ready").exists():
        print(f"workspace: repurchase demo --members {args.members}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pipelines.cli", "demo", "--members", str(args.members)],
                       env={**os.environ, "REPURCHASE_HOME": str(home)}, cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        (home / ".ready").write_text("ok")
    sys.path.insert(0, str(ROOT))
    import pandas as pd

    from features.contract import C
    from features.settings import load_settings
    from training.campaigns import CE, POOLED, campaign_effects, read_lines, read_log
    from training.uplift import evaluate_uplift, uplift_frame

    s = load_settings(environ={"REPURCHASE_HOME": str(home)})
    truth = pd.read_parquet(s.dirs.raw / "demo" / "truth" / "campaign_effects.parquet").set_index(C.CAMPAIGN_ID)
    log, lines = read_log(s), read_lines(s)
    t = time.perf_counter()
    report = campaign_effects(log, lines, windows=s.lists.windows_days)
    report_s = time.perf_counter() - t
    covered = []
    for r in report.itertuples(index=False):
        rec = r._asdict()
        planted = float(truth.loc[rec[CE.CAMPAIGN_ID], f"uplift_abs_{rec[CE.WINDOW]}d"])
        covered.append({"campaign": rec[CE.CAMPAIGN_ID], "days": rec[CE.WINDOW], "planted": round(planted, 4),
                        "lift": round(rec[CE.LIFT], 4), "low": round(rec[CE.LIFT_LOW], 4),
                        "high": round(rec[CE.LIFT_HIGH], 4), "inside": rec[CE.LIFT_LOW] <= planted <= rec[CE.LIFT_HIGH],
                        "lift_over_planted": round(rec[CE.LIFT] / planted, 3) if planted else None})
    t = time.perf_counter()
    frame, columns = uplift_frame(s, log, lines, args.window, s.lists.redemption_tolerance)
    up = evaluate_uplift(frame, columns)
    up.pop("score")
    uplift_s = time.perf_counter() - t
    pooled = [c for c in covered if c["campaign"] == POOLED]
    result: dict[str, Any] = {
        "members": args.members if args.home is None else None, "home": str(home), "window_days": args.window,
        "report_seconds": round(report_s, 2), "uplift_seconds": round(uplift_s, 2), "effects": covered,
        "uplift": up,
        "summary": {"pooled_inside": [c["inside"] for c in pooled],
                    "campaign_windows_inside": f"{sum(c['inside'] for c in covered)}/{len(covered)}",
                    "qini_model": round(up["qini"], 5), "qini_random_p95": round(up["random_qini_p95"], 5),
                    "qini_over_random_p95": round(up["qini"] / up["random_qini_p95"], 2),
                    "uplift_at_20_over_overall": round(up["uplift_at"]["0.2"] / up["overall_uplift"], 2),
                    "goals": {"planted_within_interval_pooled": all(c["inside"] for c in pooled),
                              "qini_beats_random": up["beats_random"]}}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, default=str))
    for k, v in result["summary"].items():
        print(f"{k:28s} {v}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()

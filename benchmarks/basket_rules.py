"""Benchmark: association rules, ours (sparse co-occurrence) against mlxtend (apriori + association_rules).

    uv run python benchmarks/basket_rules.py [--min-support 0.01 0.005] [--repeats 3] [--json]

Baskets: the Online Retail file in ../shared/data (ingested with the built-in mapping into a temporary
workspace; December 2010, one invoice one basket, 1,394 baskets over 2,407 items). For each minimum support,
both build every rule between two items from the same 0/1 basket matrix: ours is
``training.basket.association_rules(baskets, min_count=1, min_support=s)`` from the sparse matrix; the
reference is mlxtend's ``apriori(onehot, min_support=s, max_len=2)`` then ``association_rules(...,
metric="confidence", min_threshold=0)`` on the one-hot DataFrame (built before timing; mlxtend's preferred
input). The same rules are checked (count, and support / confidence / lift equal to 1e-9) before timing.
Each time is the best of ``--repeats``, the two interleaved. Goal (issue): ours at least 10 times faster.
Writes benchmarks/results/basket_rules.json; ``--json`` prints the result as the last line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.scoring import bench_settings, machine, write_result  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "online_retail"
RESULTS = ROOT / "benchmarks" / "results" / "basket_rules.json"
GOAL_RATIO = 10.0


def december_baskets(tmp: Path) -> Any:
    from features.contract import C
    from features.ingest import ingest, sources_from_dir
    from training.basket import Baskets
    from training.dataset import read_lake_table

    s = bench_settings(tmp / "home")
    ingest(sources_from_dir(DATA, "online-retail"), "online-retail", s)
    lines = read_lake_table(s, "transactions")
    return Baskets.from_lines(lines[lines[C.TS] < pd.Timestamp("2011-01-01", tz="UTC")])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--min-support", type=float, nargs="+", default=[0.01, 0.005])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        raise SystemExit(f"the Online Retail file is not in {DATA}")
    from mlxtend.frequent_patterns import apriori
    from mlxtend.frequent_patterns import association_rules as mlx_rules

    from training.basket import R, association_rules

    at_start = machine()
    with tempfile.TemporaryDirectory() as tmp:
        baskets = december_baskets(Path(tmp))
    onehot = pd.DataFrame(baskets.matrix.toarray().astype(bool), columns=baskets.labels.astype(str))
    rows = []
    for s in args.min_support:
        def ours() -> pd.DataFrame:
            return association_rules(baskets, min_count=1, min_support=s)  # noqa: B023

        def reference() -> pd.DataFrame:
            f = apriori(onehot, min_support=s, use_colnames=True, max_len=2)  # noqa: B023
            return mlx_rules(f, num_itemsets=baskets.n, metric="confidence", min_threshold=0.0)

        a, b = ours(), reference()
        ref = pd.DataFrame({R.ANTECEDENT: [next(iter(x)) for x in b["antecedents"]],
                            R.CONSEQUENT: [next(iter(x)) for x in b["consequents"]], "lift_ref": b["lift"]})
        merged = a.merge(ref, on=[R.ANTECEDENT, R.CONSEQUENT], validate="1:1")
        same = len(a) == len(b) == len(merged) and bool(np.allclose(merged[R.LIFT], merged["lift_ref"],
                                                                    rtol=0, atol=1e-9))
        t_ours, t_ref = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            ours()
            t_ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            reference()
            t_ref.append(time.perf_counter() - t)
        row = {"min_support": s, "rules": len(a), "same_rules": same, "ours_s": round(min(t_ours), 4),
               "mlxtend_s": round(min(t_ref), 4), "speedup": round(min(t_ref) / min(t_ours), 1)}
        row["goal_met"] = row["speedup"] >= GOAL_RATIO and same
        rows.append(row)
        print(f"min support {s}: {len(a):,} rules (same as mlxtend: {same}); ours {row['ours_s']} s, "
              f"mlxtend {row['mlxtend_s']} s: {row['speedup']}x", flush=True)
    result = {"benchmark": "basket_rules", "started": datetime.now().astimezone().isoformat(timespec="seconds"),
              "baskets": baskets.n, "items": len(baskets.labels), "repeats": args.repeats, "results": rows,
              "goal_speedup": GOAL_RATIO, "machine": at_start}
    return write_result(RESULTS, result, args.json)


if __name__ == "__main__":
    main()

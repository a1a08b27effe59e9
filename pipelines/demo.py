"""The main job and the steps it wires together: demo data, ingest, features, Feast, one online read.

Each function here is orchestration only: it calls one library function per step, times it and returns a
plain dict summary that the CLI prints (or emits as JSON).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from features.contract import C, F
from features.lake import FEATURE_VIEWS, MEMBER_VIEW, connect_duckdb, snapshot_dates, table_glob
from features.settings import Settings

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def _noop(_msg: str) -> None:
    return None


def generate_raw(settings: Settings, members: int, seed: int | None = None, out_dir: Path | None = None,
                 progress: Progress | None = None) -> Any:
    """Generate demo raw files (and their planted truth) under ``<raw>/demo`` by default."""
    from features.synthetic import generate_demo_data

    target = out_dir or settings.dirs.raw / "demo"
    return generate_demo_data(target, members=members, seed=settings.demo.seed if seed is None else seed,
                              start=settings.demo.start, days=settings.demo.days, progress=progress)


def last_transaction_date(settings: Settings) -> date:
    """The date of the last transaction in the lake."""

    import duckdb

    glob = table_glob(settings, "transactions")
    try:
        with connect_duckdb() as con:
            (last,) = con.execute(f"select max({C.TS}) from read_parquet('{glob}', hive_partitioning=false)"
                                  ).fetchone()
    except duckdb.IOException:
        raise FileNotFoundError(f"no transactions in the lake ({glob}): run `repurchase ingest` first") from None
    if last is None:
        raise FileNotFoundError(f"the transactions in the lake ({glob}) are empty")
    return last.date()


def build_features(settings: Settings, dates: list[date] | None = None, history: bool = False,
                   progress: Progress | None = None) -> dict[str, Any]:
    """Compute feature snapshots as of ``dates`` (default: the day after the last transaction), plus the
    historical training snapshots when ``history`` is set."""
    from features.compute import compute_features, default_snapshot_dates

    progress = progress or _noop
    latest = last_transaction_date(settings) + timedelta(days=1)
    wanted = set(dates or [latest])
    if history:
        wanted |= set(default_snapshot_dates(settings, latest))
    ordered = sorted(wanted)
    progress(f"computing {len(ordered)} feature snapshot(s) {ordered[0]} .. {ordered[-1]}")
    t0 = time.perf_counter()
    written = compute_features(settings, ordered,
                               progress=lambda n, total, d: progress(f"snapshot {n}/{total} as of {d}"))
    return {"snapshots": len(ordered), "first_as_of": ordered[0].isoformat(), "last_as_of": ordered[-1].isoformat(),
            "files": sum(len(v) for v in written.values()), "seconds": round(time.perf_counter() - t0, 2)}


def segment_report(settings: Settings, as_of: date | None = None, compare: date | None = None) -> dict[str, Any]:
    """RFM segment and lifecycle stage distribution of a member snapshot; transitions from ``compare``."""
    import pandas as pd

    from features.lake import snapshot_path
    from features.segments import Dist, segment_distribution, transition_matrix

    available = snapshot_dates(settings)
    if not available:
        raise FileNotFoundError("no member feature snapshots yet: run `repurchase features build` first")
    as_of = as_of or available[-1]

    def load(d: date) -> pd.DataFrame:
        path = snapshot_path(settings, MEMBER_VIEW, d.isoformat())
        if not path.exists():
            raise FileNotFoundError(f"no member snapshot as of {d} ({path}); snapshots exist for "
                                    f"{', '.join(x.isoformat() for x in available[-5:])}"
                                    f"{' and earlier' if len(available) > 5 else ''}")
        return pd.read_parquet(path, columns=[C.MEMBER_ID, F.RFM_SEGMENT, F.LIFECYCLE_STAGE])

    snap = load(as_of)
    dist = segment_distribution(snap, settings)
    rep: dict[str, Any] = {"as_of": as_of.isoformat(), "members": len(snap)}
    for kind, key in (("segment", "segments"), ("stage", "stages")):
        part = dist[dist[Dist.KIND] == kind]
        rep[key] = [{"name": str(r[Dist.NAME]), "members": int(r[Dist.MEMBERS]), "share": float(r[Dist.SHARE])}
                    for _, r in part.iterrows()]
    if compare:
        matrix = transition_matrix(load(compare), snap)
        rep["transitions"] = {"from": compare.isoformat(), "index": [str(i) for i in matrix.index],
                              "columns": [str(c) for c in matrix.columns],
                              "counts": matrix.astype(int).to_numpy().tolist()}
    return rep


def load_online_store(settings: Settings, method: str = "bulk", progress: Progress | None = None) -> dict[str, Any]:
    """Load the latest snapshot of every view into the online store."""
    from features.online import load_online

    progress = progress or _noop
    loaded: dict[str, Any] = {}
    for view in FEATURE_VIEWS:
        progress(f"loading {view} into the {settings.profile} online store ({method})")
        rep = load_online(settings, view, method=method)
        loaded[view] = {"rows": rep.rows, "seconds": round(rep.seconds, 2)}
    return loaded


def run_demo(settings: Settings, members: int, progress: Progress | None = None) -> dict[str, Any]:
    """The main job on the embedded default: generate, ingest, features, apply, online load, one read."""
    import pandas as pd

    from features.ingest import ingest, sources_from_dir
    from features.store import apply, online_features

    progress = progress or _noop
    timings: dict[str, float] = {}
    report: dict[str, Any] = {"profile": settings.profile, "home": str(settings.dirs.home)}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        result = fn()
        timings[name] = round(time.perf_counter() - t0, 2)
        return result

    progress(f"generating demo data for {members:,} members")
    summary = timed("demo_data", lambda: generate_raw(settings, members, progress=progress))
    report["demo_data"] = summary_dict(summary)

    raw = settings.dirs.raw / "demo"
    progress("ingesting the demo files into the lake")
    ing = timed("ingest", lambda: ingest(sources_from_dir(raw, "demo"), "demo", settings, mode="replace"))
    report["ingest"] = {name: {k: t[k] for k in ("read", "accepted", "rejected", "written")}
                        for name, t in ing.to_dict()["tables"].items()}
    if not ing.reconciles:
        raise RuntimeError(f"ingest counts do not reconcile: {report['ingest']}")

    report["features"] = timed("features", lambda: build_features(settings, history=True, progress=progress))
    progress("applying the Feast definitions")
    timed("feast_apply", lambda: apply(settings))
    report["online_load"] = timed("online_load", lambda: load_online_store(settings, progress=progress))

    latest = snapshot_dates(settings)[-1]
    member_id = _an_active_member(settings, latest)
    progress(f"reading member {member_id} from the online store")
    # The demo's clock is the end of its data, so the feature age reads as it would on that day.
    frame = timed("online_read", lambda: online_features(settings, [member_id], "serving_v1",
                                                         now=pd.Timestamp(latest, tz="UTC")))
    report["online_read"] = {"member_id": member_id, "clock": latest.isoformat(),
                             "features": frame.iloc[0].to_dict()}
    report["seconds"] = timings
    return report


def _an_active_member(settings: Settings, latest: date) -> str:
    """A member who is active in the latest snapshot (the demo's example read)."""
    import pandas as pd

    from features.lake import snapshot_path

    snap = pd.read_parquet(snapshot_path(settings, MEMBER_VIEW, latest.isoformat()),
                           columns=[C.MEMBER_ID, F.LIFECYCLE_STAGE, F.ORDERS_TOTAL])
    active = snap[snap[F.LIFECYCLE_STAGE] == "active"].sort_values([F.ORDERS_TOTAL, C.MEMBER_ID])
    pick = active if len(active) else snap
    return str(pick.iloc[len(pick) // 2][C.MEMBER_ID])


def summary_dict(obj: Any) -> dict[str, Any]:
    """The scalar fields of a result dataclass (paths as strings), for printing or JSON."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(obj).items()
            if not isinstance(v, list | dict)}

"""``repurchase run-daily``: everything a day needs, in order, unattended.

Steps (each one's outputs are written whole, in one rename, so a failure or a kill leaves the previous
good outputs of that step as they were):

1. ``ingest``: the new raw files of ``--raw`` through ``--mapping``, appended to the lake (skipped without
   ``--raw``);
2. ``features``: the feature snapshots as of the run date (default: the day after the last transaction);
3. ``feast``: the Feast definitions applied;
4. ``online``: the latest snapshots loaded into the online store;
5. ``score``: every member by the champion models (``repurchase score``), the partition of the date;
6. ``lists``: the lists of ``settings.daily.lists`` (name, filters) exported as
   ``<outputs>/lists/<name>-<date>.csv`` with their holdouts, sent at ``daily.send_hour`` on the next day;
7. ``dashboard``: the dashboard page and its numbers.

A run for a date that already ran writes the same outputs again (the same inputs give the same bytes; the
manifest's timings aside). The run's manifest, with each step's status and seconds, is written last to
``<outputs>/runs/<date>/manifest.json``; a failed step stops the run with a non-zero exit and a message
naming the step, and the manifest says which steps finished.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from features.settings import Settings

Progress = Callable[[str], None]
STEPS = ("ingest", "features", "feast", "online", "score", "lists", "dashboard")


class DailyError(RuntimeError):
    """A step of the daily run failed; ``step`` names it, ``done`` the steps that finished before it."""

    def __init__(self, step: str, cause: BaseException, done: list[str]) -> None:
        super().__init__(f"step '{step}' failed: {type(cause).__name__}: {cause}. Steps done before it: "
                         f"{', '.join(done) or 'none'}; every step's earlier outputs are untouched")
        self.step, self.done = step, done


def run_daily(settings: Settings, run_date: date | None = None, raw: Path | None = None,
              mapping: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Run the day's steps; return the manifest. Raises :class:`DailyError` naming the step that failed."""
    progress = progress or (lambda _m: None)
    steps: dict[str, dict[str, Any]] = {}
    done: list[str] = []
    state: dict[str, Any] = {}

    def step(name: str, fn: Callable[[], Any]) -> None:
        progress(f"step {name}")
        t = time.perf_counter()
        try:
            out = fn()
        except Exception as e:
            steps[name] = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                           "seconds": round(time.perf_counter() - t, 2)}
            _write_manifest(settings, state.get("date"), steps, failed=name)
            raise DailyError(name, e, done) from e
        steps[name] = {"status": "done" if out is not None else "skipped", "seconds": round(time.perf_counter() - t, 2),
                       **({"result": out} if isinstance(out, dict) else {})}
        done.append(name)

    step("ingest", lambda: _ingest(settings, raw, mapping))
    step("features", lambda: _features(settings, run_date, state))
    step("feast", lambda: _apply(settings))
    step("online", lambda: _online(settings))
    step("score", lambda: _score(settings, state["date"]))
    step("lists", lambda: _lists(settings, state["date"]))
    step("dashboard", lambda: _dashboard(settings))
    return _write_manifest(settings, state["date"], steps, failed=None)


def _write_manifest(settings: Settings, day: date | None, steps: dict[str, Any], failed: str | None) -> dict[str, Any]:
    from features.lake import atomic_path

    name = day.isoformat() if day else "unknown-date"
    path = settings.dirs.outputs / "runs" / name / "manifest.json"
    body = {"date": name, "status": "failed" if failed else "done", "failed_step": failed, "steps": steps,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"), "path": str(path)}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(body, indent=2, sort_keys=True, default=str))
    return body


def _ingest(settings: Settings, raw: Path | None, mapping: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    from features.ingest import ingest, sources_from_dir

    if mapping is None:
        raise ValueError("--raw needs --mapping (a built-in mapping name or a YAML file)")
    rep = ingest(sources_from_dir(raw, mapping), mapping, settings, mode="append")
    if not rep.reconciles:
        raise RuntimeError(f"ingest counts do not reconcile: {rep.to_dict()['tables']}")
    return {name: {k: t[k] for k in ("read", "accepted", "rejected", "written")}
            for name, t in rep.to_dict()["tables"].items()}


def _features(settings: Settings, run_date: date | None, state: dict[str, Any]) -> dict[str, Any]:
    from pipelines.demo import build_features, last_transaction_date

    day = run_date or last_transaction_date(settings) + timedelta(days=1)
    state["date"] = day
    return build_features(settings, [day])


def _apply(settings: Settings) -> dict[str, Any]:
    from features.store import apply

    apply(settings)
    return {"applied": True}


def _online(settings: Settings) -> dict[str, Any]:
    from pipelines.demo import load_online_store

    return load_online_store(settings)


def _score(settings: Settings, day: date) -> dict[str, Any]:
    from pipelines.score import score

    rep = score(settings, day)
    return {k: rep[k] for k in ("as_of", "members", "recommendation_rows", "versions", "run_id")}


def _lists(settings: Settings, day: date) -> dict[str, Any]:
    from pipelines.lists import ListFilters, build_list, export_list

    sent = datetime(day.year, day.month, day.day, settings.daily.send_hour, tzinfo=UTC) + timedelta(days=1)
    out: dict[str, Any] = {}
    for spec in settings.daily.lists:
        filters = ListFilters(stages=tuple(spec.stages), segments=tuple(spec.segments), bands=tuple(spec.bands),
                              min_value=spec.min_value, category_due=spec.category_due, top=spec.top)
        name = f"{spec.name}-{day.isoformat()}"
        frame, manifest = build_list(settings, filters, name, day)
        rep = export_list(settings, frame, manifest, settings.dirs.outputs / "lists" / f"{name}.csv", sent_at=sent)
        out[spec.name] = {"members": rep["members"], "holdout": rep["holdout"], "file": rep["file"]}
    return out


def _dashboard(settings: Settings) -> dict[str, Any]:
    from pipelines.dashboard import build_dashboard

    rep = build_dashboard(settings)
    return {"path": rep["path"], "charts": rep["charts"]}

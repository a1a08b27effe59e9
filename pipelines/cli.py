"""The one CLI, ``repurchase``: a sub-command per job.

Each command parses options, loads settings, calls one library function and prints a short summary
(or, with ``--json``, one JSON object as its last line). Heavy imports (Feast, DuckDB, MLflow) happen
inside the commands so ``repurchase --help`` stays quick.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import typer

from features.settings import Settings, SettingsError, load_settings
from pipelines.console import configure_logging, emit_json, err, kv_table, out, progress_steps

app = typer.Typer(help="repurchase: member churn, next purchase, value and recommendations.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
features_app = typer.Typer(help="Compute feature snapshots and manage the Feast store.", no_args_is_help=True)
app.add_typer(features_app, name="features")
models_app = typer.Typer(help="The model registry: promote a challenger, roll back, show the history.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")
lists_app = typer.Typer(help="Marketer lists from the scores, with a holdout.", no_args_is_help=True)
app.add_typer(lists_app, name="lists")
campaigns_app = typer.Typer(help="Campaign effect against the holdout.", no_args_is_help=True)
app.add_typer(campaigns_app, name="campaigns")

log = logging.getLogger(__name__)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")]


@dataclass
class _State:
    settings_path: Path | None = None
    _settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = load_settings(self.settings_path)
            except SettingsError as e:
                _fail(str(e))
        return self._settings


state = _State()


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _report(json_out: bool, title: str, summary: dict[str, Any], payload: dict[str, Any] | None = None) -> None:
    if json_out:
        emit_json(payload if payload is not None else summary)
    else:
        out.print(kv_table(title, summary))


def _parse_date(value: str, option: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        _fail(f"{option}: {value!r} is not a date (expected YYYY-MM-DD)")
        raise  # unreachable, for type checkers


@app.callback()
def main(
    settings: Annotated[Path | None, typer.Option(
        "--settings", envvar="REPURCHASE_SETTINGS", help="Settings YAML merged over the defaults.")] = None,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "WARNING",
) -> None:
    """repurchase: member churn, next purchase, value and recommendations for membership retail."""
    configure_logging(log_level)
    state.settings_path = settings
    state._settings = None


@app.command("demo-data")
def demo_data(
    members: Annotated[int | None, typer.Option(min=1, help="Members to generate (default: settings demo.members).")]
    = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default: settings demo.seed).")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default: <raw>/demo).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Generate a seeded, realistic retail history with its planted truth."""
    from pipelines.demo import generate_raw

    s = state.settings
    with progress_steps(not json_out) as step:
        summary = generate_raw(s, members=members or s.demo.members, seed=seed, out_dir=out_dir, progress=step)
    from pipelines.demo import summary_dict

    _report(json_out, "demo data", summary_dict(summary))


@app.command()
def ingest(
    raw: Annotated[Path | None, typer.Option(help="Folder of raw files, found by the mapping's patterns.")] = None,
    transactions: Annotated[list[Path] | None, typer.Option(help="Transactions file(s).")] = None,
    members: Annotated[list[Path] | None, typer.Option(help="Members file(s).")] = None,
    items: Annotated[list[Path] | None, typer.Option(help="Items file(s).")] = None,
    campaigns: Annotated[list[Path] | None, typer.Option(help="Campaign log file(s).")] = None,
    mapping: Annotated[str, typer.Option(help="Built-in mapping (demo, cdnow, online-retail) or a YAML file.")]
    = "demo",
    mode: Annotated[str, typer.Option(help="replace the lake, or append and deduplicate.")] = "replace",
    json_out: JsonOpt = False,
) -> None:
    """Validate raw files through a column mapping into the lake; bad rows go to a rejects file."""
    from features.ingest import IngestError, sources_from_dir
    from features.ingest import ingest as run_ingest

    if mode not in ("replace", "append"):
        _fail(f"--mode: {mode!r} is not one of replace, append")
    s = state.settings
    try:
        sources: dict[str, list[Path]] = sources_from_dir(raw, mapping) if raw else {}
        for name, files in (("transactions", transactions), ("members", members), ("items", items),
                            ("campaigns", campaigns)):
            if files:
                sources[name] = list(files)
        if not sources:
            _fail("nothing to ingest: give --raw DIR or at least --transactions FILE")
        with progress_steps(not json_out) as step:
            step(f"ingesting {', '.join(f'{k} ({len(v)} file(s))' for k, v in sources.items())}")
            report = run_ingest(sources, mapping, s, mode=mode)  # type: ignore[arg-type]
    except (IngestError, FileNotFoundError) as e:
        _fail(str(e))
    payload = report.to_dict()
    if json_out:
        emit_json(payload)
    else:
        for name, t in payload["tables"].items():
            out.print(kv_table(f"ingest {name}", {k: v for k, v in t.items() if k != "rejected_by_reason"}))
            for reason, n in t.get("rejected_by_reason", {}).items():
                out.print(f"  rejected {n:,}: {reason}")
        out.print("counts reconcile (read = accepted + rejected)" if report.reconciles
                  else "[red]counts do not reconcile[/]")
    if not report.reconciles:
        raise typer.Exit(1)


@features_app.command("build")
def features_build(
    as_of: Annotated[list[str] | None, typer.Option(help="As-of date(s) YYYY-MM-DD (default: the day after "
                                                    "the last transaction).")] = None,
    history: Annotated[bool, typer.Option(help="Also build the historical snapshots for training "
                                          "(every features.snapshot_every_days over features.history_days).")]
    = False,
    json_out: JsonOpt = False,
) -> None:
    """Compute member, member x category and item feature snapshots as of dates."""
    from pipelines.demo import build_features

    s = state.settings
    dates = [_parse_date(d, "--as-of") for d in as_of or []]
    with progress_steps(not json_out) as step:
        result = build_features(s, dates or None, history=history, progress=step)
    _report(json_out, "features build", result)


@features_app.command("apply")
def features_apply(json_out: JsonOpt = False) -> None:
    """Register the Feast entities, feature views and feature services (idempotent)."""
    from features.store import apply

    s = state.settings
    with progress_steps(not json_out) as step:
        step("applying Feast definitions")
        defs = apply(s)
    _report(json_out, "feast apply", {"project": s.feast.project, "profile": s.profile,
                                      "feature_views": sorted(defs.views), "feature_services": sorted(defs.services)})


@features_app.command("materialize")
def features_materialize(
    method: Annotated[str, typer.Option(help="bulk (fast path) or feast (Feast's materialize).")] = "bulk",
    json_out: JsonOpt = False,
) -> None:
    """Load the latest snapshots into the online store."""
    from pipelines.demo import load_online_store

    if method not in ("bulk", "feast"):
        _fail(f"--method: {method!r} is not one of bulk, feast")
    s = state.settings
    with progress_steps(not json_out) as step:
        rows = load_online_store(s, method=method, progress=step)
    if json_out:
        emit_json(rows)
    else:
        out.print(kv_table("online load", {k: f"{v['rows']:,} rows in {v['seconds']} s" for k, v in rows.items()}))


@features_app.command("online")
def features_online(
    member_ids: Annotated[list[str], typer.Argument(help="Member id(s) to read.")],
    service: Annotated[str, typer.Option(help="Feature service to read through.")] = "serving_v1",
    json_out: JsonOpt = False,
) -> None:
    """Read members' features from the online store, as the API does."""
    from features.store import online_features

    frame = online_features(state.settings, member_ids, service)
    records = frame.to_dict(orient="records")
    if json_out:
        emit_json({"service": service, "members": records})
    else:
        for rec in records:
            out.print(kv_table(f"online features ({service})", rec))


@app.command()
def segments(
    as_of: Annotated[str | None, typer.Option(help="Date YYYY-MM-DD of the snapshot (default: latest).")] = None,
    compare: Annotated[str | None, typer.Option(help="Earlier date: print the lifecycle transition matrix "
                                                "from it to --as-of.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """RFM segment and lifecycle stage distribution as of a date; transitions between two dates."""
    from pipelines.demo import segment_report

    s = state.settings
    try:
        rep = segment_report(s, _parse_date(as_of, "--as-of") if as_of else None,
                             _parse_date(compare, "--compare") if compare else None)
    except FileNotFoundError as e:
        _fail(str(e))
    if json_out:
        emit_json(rep)
        return
    from rich.table import Table

    for key, title in (("segments", "RFM segments"), ("stages", "lifecycle stages")):
        t = Table(title=f"{title} as of {rep['as_of']}", title_justify="left")
        t.add_column("name")
        t.add_column("members", justify="right")
        t.add_column("share", justify="right")
        for row in rep[key]:
            t.add_row(row["name"], f"{row['members']:,}", f"{row['share']:.1%}")
        out.print(t)
    if rep.get("transitions"):
        tr = rep["transitions"]
        t = Table(title=f"lifecycle transitions {tr['from']} -> {rep['as_of']} (rows: from, columns: to)",
                  title_justify="left")
        t.add_column("from \\ to")
        for c in tr["columns"]:
            t.add_column(c, justify="right")
        for r, vals in zip(tr["index"], tr["counts"], strict=True):
            t.add_row(r, *(f"{v:,}" for v in vals))
        out.print(t)


@app.command()
def demo(
    members: Annotated[int | None, typer.Option(min=1, help="Members to generate (default: settings demo.members).")]
    = None,
    json_out: JsonOpt = False,
) -> None:
    """The main job: demo data, ingest, features, Feast apply and online load, one online read."""
    from pipelines.demo import run_demo

    s = state.settings
    with progress_steps(not json_out) as step:
        rep = run_demo(s, members=members or s.demo.members, progress=step)
    if json_out:
        emit_json(rep)
        return
    out.print(kv_table("demo data", {k: rep["demo_data"][k] for k in ("members", "orders", "lines", "items")}))
    out.print(kv_table("ingest (read = accepted + rejected)",
                       {t: f"{v['read']:,} = {v['accepted']:,} + {v['rejected']:,}" for t, v in rep["ingest"].items()}))
    out.print(kv_table("features", rep["features"]))
    out.print(kv_table("online load", {v: f"{r['rows']:,} rows in {r['seconds']} s"
                                       for v, r in rep["online_load"].items()}))
    read = rep["online_read"]
    out.print(kv_table(f"online features of member {read['member_id']} (clock: {read['clock']})",
                       read["features"]))
    out.print(kv_table("seconds", rep["seconds"]))


_MODEL_HELP = "churn, next-purchase, value or recommend"
_REC_ERRORS: tuple[type[Exception], ...] = (FileNotFoundError, ValueError, KeyError, LookupError)


def _print_recommend(rep: dict[str, Any]) -> None:
    out.print(kv_table(f"recommend at cutoff {rep['cutoff']}", {
        "training lines": f"{rep['train_lines']:,}", "judged members": f"{rep['members']:,}",
        "cold members (not judged)": f"{rep['cold_members']:,}", "window (days)": rep["horizon_days"],
        "tuning trials": rep["tuning_trials"], "MLflow run": rep.get("run_id"),
        **({"registered": f"recommend v{rep['version']} (challenger)"} if rep.get("version") else {}),
        "seconds": ", ".join(f"{k} {v}" for k, v in rep["seconds"].items())}))
    out.print(_metrics_table(f"top-{rep['k']} metrics (model first, then baselines on the same members)",
                             rep["metrics"]))


def _metrics_table(title: str, metrics: dict[str, dict[str, Any]]) -> Any:
    from rich.table import Table

    keys: list[str] = []
    for vals in metrics.values():
        keys += [k for k in vals if k not in keys and k != "rows"]
    t = Table(title=title, title_justify="left")
    t.add_column("metric")
    for method in metrics:
        t.add_column(method, justify="right")
    for k in keys:
        t.add_row(k, *("" if metrics[m].get(k) is None else f"{metrics[m][k]:.4f}" for m in metrics))
    return t


def _print_training(rep: dict[str, Any]) -> None:
    out.print(kv_table(f"{rep['kind']} at cutoff {rep['cutoff']}", {
        "training cutoffs": ", ".join(rep["train_cutoffs"]), "training rows": f"{rep['train_rows']:,}",
        "backtest rows": f"{rep['test_rows']:,}", "horizon (days)": rep["horizon_days"],
        "tuning trials": rep["tuning_trials"], "MLflow run": rep.get("run_id"),
        **({"registered": f"{rep['registered_model']} v{rep['version']} (challenger)"} if rep.get("version") else {}),
        "seconds": ", ".join(f"{k} {v}" for k, v in rep["seconds"].items())}))
    out.print(_metrics_table("backtest metrics (model first, then baselines on the same rows)", rep["metrics"]))


@app.command()
def train(
    model: Annotated[str, typer.Argument(help=f"{_MODEL_HELP}, or all.")],
    cutoff: Annotated[str | None, typer.Option(help="Backtest cutoff YYYY-MM-DD (default: the latest whose "
                                               "labels are observed).")] = None,
    horizon: Annotated[int | None, typer.Option(min=1, help="Label window in days (default from settings).")]
    = None,
    json_out: JsonOpt = False,
) -> None:
    """Tune, fit and backtest a model, log it to MLflow and register it as challenger."""
    from pipelines import recommend as rec
    from pipelines.models import KIND_NAMES, train_model
    from training.backtest import BacktestError
    from training.dataset import TrainingSetError, lake_session

    s = state.settings
    names = [*KIND_NAMES, "recommend"] if model == "all" else [model]
    if model not in ("all", "recommend") and model not in KIND_NAMES and model not in KIND_NAMES.values():
        _fail(f"unknown model {model!r}; choose one of {', '.join(KIND_NAMES)}, recommend or all")
    cut = _parse_date(cutoff, "--cutoff") if cutoff else None
    reports: dict[str, Any] = {}
    try:
        with progress_steps(not json_out) as step, lake_session():
            for name in names:
                if name == "recommend":
                    reports[name] = rec.train(rec._with_horizon(s, horizon), cut, progress=step)
                else:
                    reports[name] = train_model(s, name, cut, horizon, progress=step)
    except (BacktestError, TrainingSetError, *_REC_ERRORS) as e:
        _fail(str(e))
    if json_out:
        emit_json(reports if model == "all" else reports[model])
        return
    for name, rep in reports.items():
        (_print_recommend if name == "recommend" else _print_training)(rep)
    out.print("promote with `repurchase models promote NAME` (only a better challenger becomes champion)")


@app.command()
def backtest(
    model: Annotated[str, typer.Argument(help=_MODEL_HELP)],
    cutoff: Annotated[str, typer.Option(help="Backtest cutoff YYYY-MM-DD: features before it, labels from it.")],
    horizon: Annotated[int | None, typer.Option(min=1, help="Label window in days (default from settings).")]
    = None,
    data: Annotated[list[Path] | None, typer.Option(help="Evaluate this export instead of the workspace: a "
                                                    "transactions file (or a folder), ingested into a "
                                                    "temporary workspace first.")] = None,
    mapping: Annotated[str | None, typer.Option(help="Mapping of --data: built-in (demo, cdnow, online-retail) "
                                                "or a YAML file.")] = None,
    tune: Annotated[bool, typer.Option(help="Tune with optuna within settings' bounds.")] = True,
    k: Annotated[int, typer.Option(min=1, help="recommend: the K of recall@K and the other top-K metrics.")]
    = 10,
    json_out: JsonOpt = False,
) -> None:
    """Measure a model beside its baselines on one time-based backtest; JSON keyed by method."""
    from features.ingest import IngestError
    from pipelines.models import backtest as run_backtest_cmd
    from pipelines.models import backtest_file
    from training.backtest import BacktestError
    from training.dataset import TrainingSetError

    s = state.settings
    cut = _parse_date(cutoff, "--cutoff")
    if data and not mapping:
        _fail("--data needs --mapping (a built-in mapping such as cdnow or online-retail, or a YAML file)")
    if mapping and not data:
        _fail("--mapping is only used with --data")
    from pipelines import recommend as rec

    try:
        with progress_steps(not json_out) as step:
            if model == "recommend" and data:
                rep = rec.backtest_file(s, cut, data, mapping or "", k, horizon, tune_params=tune, progress=step)
            elif model == "recommend":
                rep = rec.backtest(s, cut, k, horizon, tune_params=tune, progress=step)
            elif data:
                rep = backtest_file(s, model, cut, data, mapping or "", horizon, tune_params=tune, progress=step)
            else:
                rep = run_backtest_cmd(s, model, cut, horizon, tune_params=tune, progress=step)
    except (BacktestError, TrainingSetError, IngestError, *_REC_ERRORS) as e:
        _fail(str(e))
    if json_out:
        emit_json(rep["metrics"])
        return
    (_print_recommend if model == "recommend" else _print_training)(rep)


def _split_list(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


@app.command()
def rules(
    items: Annotated[str | None, typer.Option(help="Comma-separated items (or categories with --by category): "
                                              "list what goes with them instead of the top rules.")] = None,
    by: Annotated[str | None, typer.Option(help="item or category (default from settings.basket.by).")] = None,
    top: Annotated[int | None, typer.Option(min=1, help="Rules or answers shown (default settings).")] = None,
    min_count: Annotated[int | None, typer.Option(min=1, help="Fewest baskets holding both sides.")] = None,
    min_confidence: Annotated[float | None, typer.Option(min=0, max=1, help="Smallest confidence.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Association rules over the lake's baskets (support, confidence, lift, conviction; exact counts)."""
    from pipelines import recommend as rec

    if by is not None and by not in ("item", "category"):
        _fail(f"--by must be item or category, got {by!r}")
    try:
        rep = rec.rules(state.settings, by, _split_list(items) or None, top, min_count, min_confidence)
    except _REC_ERRORS as e:
        _fail(str(e))
    if json_out:
        emit_json(rep)
        return
    from rich.table import Table

    rows = rep.get("goes_with", rep.get("rules", []))
    title = (f"goes with {', '.join(rep['basket'])}" if "basket" in rep else
             f"top rules by lift ({rep['rules_found']:,} found in {rep['baskets']:,} baskets)")
    t = Table(title=title, title_justify="left")
    for col in (rows[0].keys() if rows else ["(none)"]):
        t.add_column(str(col))
    for r in rows:
        t.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()))
    out.print(t)
    if rep.get("unknown"):
        out.print(f"in no basket: {', '.join(rep['unknown'])}")


@app.command()
def recommend(
    members: Annotated[list[str] | None, typer.Argument(help="Member ids.")] = None,
    n: Annotated[int | None, typer.Option(min=1, help="Recommendations per member (default settings).")] = None,
    alias: Annotated[str, typer.Option(help="Registry alias of the recommender.")] = "champion",
    exclude_items: Annotated[str | None, typer.Option(help="Comma-separated items never to show.")] = None,
    exclude_categories: Annotated[str | None, typer.Option(help="Comma-separated categories.")] = None,
    category: Annotated[str | None, typer.Option(help="Comma-separated categories to recommend from.")] = None,
    all_members: Annotated[bool, typer.Option("--all", help="Every member, written to --out.")] = False,
    out_file: Annotated[Path | None, typer.Option("--out", help="Parquet file for --all.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Top-N recommendations from the registered recommender, with their reasons; --all writes every member's."""
    from pipelines import recommend as rec

    s = state.settings
    if all_members:
        if out_file is None:
            _fail("--all needs --out FILE (parquet)")
        try:
            rep = rec.batch(s, out_file, alias, n)
        except _REC_ERRORS as e:
            _fail(str(e))
        _report(json_out, "batch recommendations", rep)
        return
    if not members:
        _fail("name one or more member ids, or --all --out FILE")
    try:
        model, _, _, version = rec.registered(s, alias)
        frame = model.recommend(members, n=n, exclude_items=_split_list(exclude_items),
                                exclude_categories=_split_list(exclude_categories),
                                categories=_split_list(category) or None, explain=True)
    except _REC_ERRORS as e:
        _fail(str(e))
    records = frame.astype({"because_item": object}).where(frame.notna(), None).to_dict(orient="records")
    if json_out:
        emit_json({"version": version, "recommendations": records})
        return
    from rich.table import Table

    t = Table(title=f"recommend v{version} ({alias})", title_justify="left")
    for col in ("member_id", "rank", "item_id", "score", "source", "reason"):
        t.add_column(col)
    for r in records:
        t.add_row(str(r["member_id"]), str(r["rank"]), str(r["item_id"]), f"{r['score']:.4f}", r["source"],
                  r["reason"])
    out.print(t)


@models_app.command("promote")
def models_promote(
    name: Annotated[str, typer.Argument(help="Registered model: churn, next_purchase, value or recommend.")],
    metric: Annotated[str | None, typer.Option(help="Backtest metric to compare (default per model).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Make the challenger champion only if it beats the champion on the same backtest."""
    from pipelines.models import registry_name as kind_of
    from training.tracking import PromotionError, promote

    try:
        result = promote(state.settings, kind_of(name), metric)
    except (PromotionError, ValueError) as e:
        _fail(str(e))
    if json_out:
        import dataclasses

        emit_json(dataclasses.asdict(result))
    else:
        out.print(result.summary(), highlight=False)
    if not result.promoted:
        raise typer.Exit(1)


@models_app.command("rollback")
def models_rollback(
    name: Annotated[str, typer.Argument(help="Registered model: churn, next_purchase, value or recommend.")],
    json_out: JsonOpt = False,
) -> None:
    """Move champion back to the version that was champion before the current one."""
    from pipelines.models import registry_name as kind_of
    from training.tracking import PromotionError, rollback

    try:
        version = rollback(state.settings, kind_of(name))
    except (PromotionError, ValueError) as e:
        _fail(str(e))
    if json_out:
        emit_json({"name": kind_of(name), "champion": version})
    else:
        out.print(f"{kind_of(name)}: champion is now v{version}", highlight=False)


@models_app.command("history")
def models_history(
    name: Annotated[str, typer.Argument(help="Registered model: churn, next_purchase, value or recommend.")],
    json_out: JsonOpt = False,
) -> None:
    """Every change of champion: when, which version, from which, and the metric behind it."""
    from pipelines.models import registry_name as kind_of
    from training.tracking import champion_history

    try:
        events = champion_history(state.settings, kind_of(name))
    except Exception as e:
        _fail(f"{name}: {e}")
    if json_out:
        emit_json({"name": kind_of(name), "history": events})
        return
    for e in events:
        out.print(f"{e['at']}  {e['action']:8s} v{e['version']} (previous {e.get('previous')})"
                  + (f"  {e['metric']}={e['value']:.4f}" if e.get("metric") else ""), highlight=False)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default: settings serving.host).")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Port (default: settings serving.port).")]
    = None,
) -> None:
    """Serve the HTTP API (BentoML) with the models at settings serving.alias; stops on Ctrl+C."""
    import os
    import subprocess

    from serving.champions import current_versions

    s = state.settings
    versions = current_versions(s)
    missing = [name for name, v in versions.items() if v is None]
    if missing:
        _fail(f"no {', '.join(f'{m}@{s.serving.alias}' for m in missing)} in the registry at {s.tracking_uri}: "
              "run `repurchase train all`, then `repurchase models promote NAME` for each")
    if not s.serving.api_keys:
        err.print("[yellow]warning:[/] no API keys (settings serving.api_keys or REPURCHASE_API_KEYS): every "
                  "call but health, readiness and metrics will be answered 401", highlight=False)
    env = dict(os.environ)
    if state.settings_path is not None:
        env["REPURCHASE_SETTINGS"] = str(Path(state.settings_path).resolve())
    h, p = host or s.serving.host, port or s.serving.port
    out.print(f"serving {versions} on http://{h}:{p} (OpenAPI page at /, schema at /docs.json)", highlight=False)
    from features.settings import PROJECT_ROOT

    cmd = [sys.executable, "-m", "bentoml", "serve", "serving.service:Repurchase", "--host", h, "--port", str(p)]
    try:
        code = subprocess.call(cmd, env=env, cwd=PROJECT_ROOT)
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(code)


@app.command()
def score(
    as_of: Annotated[str | None, typer.Option("--as-of", help="Snapshot date (default: the latest).")] = None,
    alias: Annotated[str | None, typer.Option(help="Registry alias (default: settings serving.alias).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Score every member with the models at the alias into <outputs>/scores/as_of=DATE/ (atomic), the Feast
    online store (view member_scores) and MLflow."""
    from pipelines.score import score as run_score
    from serving.champions import ChampionError

    s = state.settings
    day = _parse_date(as_of, "--as-of") if as_of else None
    try:
        rep = run_score(s, day, alias)
    except (LookupError, ChampionError, ValueError) as e:
        _fail(str(e))
    summary = {k: rep[k] for k in ("as_of", "alias", "members", "recommendation_rows", "path", "run_id")}
    summary["versions"] = ", ".join(f"{k} v{v}" for k, v in rep["versions"].items())
    summary["seconds"] = rep["seconds"]["total"]
    _report(json_out, "scores", summary, rep)


@lists_app.command("export")
def lists_export(
    name: Annotated[str, typer.Option(help="List (and campaign) name: letters, digits, - _ .")],
    out_file: Annotated[Path, typer.Option("--out", help="File to write: .csv or .xlsx.")],
    stage: Annotated[list[str] | None, typer.Option(help="Lifecycle stage (repeat for several).")] = None,
    segment: Annotated[list[str] | None, typer.Option(help="RFM segment (repeat for several).")] = None,
    band: Annotated[list[str] | None, typer.Option(help="Churn band (repeat for several).")] = None,
    min_value: Annotated[float | None, typer.Option(help="Least expected spend.")] = None,
    category_due: Annotated[str | None, typer.Option(help="Only members due in this replenishable category.")]
    = None,
    top: Annotated[int | None, typer.Option(help="The N with the most value at risk (P(churn) x value).")] = None,
    holdout_share: Annotated[float | None, typer.Option(help="Holdout share (default settings lists).")] = None,
    seed: Annotated[int | None, typer.Option(help="Holdout seed (default settings lists).")] = None,
    as_of: Annotated[str | None, typer.Option("--as-of", help="Scores date (default: the latest).")] = None,
    sent_at: Annotated[str | None, typer.Option(help="When the campaign goes out, ISO time (default now).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Export a list with reasons, suggested items and treatment, and record its holdout for the report."""
    import re
    from datetime import UTC, datetime

    from pipelines.lists import ListError, ListFilters, build_list, export_list

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        _fail(f"--name {name!r}: use 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit")
    when = None
    if sent_at:
        try:
            when = datetime.fromisoformat(sent_at)
        except ValueError:
            _fail(f"--sent-at {sent_at!r} is not an ISO time (e.g. 2026-01-05T09:00)")
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
    s = state.settings
    filters = ListFilters(stages=tuple(stage or ()), segments=tuple(segment or ()), bands=tuple(band or ()),
                          min_value=min_value, category_due=category_due, top=top)
    try:
        frame, manifest = build_list(s, filters, name, _parse_date(as_of, "--as-of") if as_of else None,
                                     holdout_share, seed)
        rep = export_list(s, frame, manifest, out_file, sent_at=when)
    except ListError as e:
        _fail(str(e))
    summary = {k: rep[k] for k in ("name", "as_of", "members", "holdout", "file", "campaign_log")}
    summary["treatments"] = ", ".join(f"{k} {v}" for k, v in rep["treatments"].items())
    _report(json_out, f"list {name}", summary, rep)


@campaigns_app.command("report")
def campaigns_report(
    log_file: Annotated[Path | None, typer.Option("--log", help="Campaign log (.parquet or .csv; default: the "
                                                  "lake's campaigns table).")] = None,
    campaign: Annotated[list[str] | None, typer.Option(help="Only this campaign (repeat for several).")] = None,
    out_file: Annotated[Path | None, typer.Option("--out", help="Also write the report as CSV.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Repurchase rate at 7/14/30 days, lift with 95% intervals, incremental revenue, coupon redemption."""
    import pandas as pd

    from features.contract import C
    from training.campaigns import CE, CampaignLogError, campaign_effects, read_lines, read_log

    s = state.settings
    try:
        log = read_log(s, log_file)
        if campaign:
            unknown = sorted(set(campaign) - set(log[C.CAMPAIGN_ID].astype(str)))
            if unknown:
                _fail(f"--campaign {', '.join(unknown)}: not in the log")
            log = log[log[C.CAMPAIGN_ID].astype(str).isin(campaign)]
        report = campaign_effects(log, read_lines(s), windows=s.lists.windows_days,
                                  tolerance=s.lists.redemption_tolerance)
    except (FileNotFoundError, CampaignLogError, ValueError, OSError) as e:
        _fail(str(e))
    if out_file is not None:
        from features.lake import atomic_path

        with atomic_path(out_file) as tmp:
            report.to_csv(tmp, index=False)
    if json_out:
        emit_json({"campaigns": report.astype(object).where(report.notna(), None).to_dict(orient="records")})
        return
    from rich.table import Table

    t = Table(title="campaign effect (treatment vs holdout)", title_justify="left")
    for col in ("campaign", "days", "treated", "held out", "rate T", "rate H", "lift [95%]", "incremental revenue",
                "redeemed"):
        t.add_column(col)
    for r in report.itertuples(index=False):
        rec = r._asdict()
        t.add_row(str(rec[CE.CAMPAIGN_ID]), str(rec[CE.WINDOW]), f"{rec[CE.N_TREATMENT]:,}", f"{rec[CE.N_HOLDOUT]:,}",
                  f"{rec[CE.RATE_TREATMENT]:.1%}", f"{rec[CE.RATE_HOLDOUT]:.1%}",
                  f"{rec[CE.LIFT]:+.1%} [{rec[CE.LIFT_LOW]:+.1%}, {rec[CE.LIFT_HIGH]:+.1%}]",
                  f"{rec[CE.INCREMENTAL]:,.0f} [{rec[CE.INCREMENTAL_LOW]:,.0f}, {rec[CE.INCREMENTAL_HIGH]:,.0f}]",
                  "" if pd.isna(rec[CE.REDEMPTION]) else f"{rec[CE.REDEMPTION]:.1%}")
    out.print(t)


@campaigns_app.command("uplift")
def campaigns_uplift(
    log_file: Annotated[Path | None, typer.Option("--log", help="Campaign log (.parquet or .csv; default: the "
                                                  "lake's campaigns table).")] = None,
    window: Annotated[int, typer.Option(min=1, help="Repurchase window in days after the send.")] = 7,
    folds: Annotated[int, typer.Option(min=2, max=20, help="Cross-fitting folds.")] = 5,
    json_out: JsonOpt = False,
) -> None:
    """Rank past campaign members by expected response to a coupon (T-learner); Qini and uplift@k vs random."""
    from training.campaigns import CampaignLogError, read_lines, read_log
    from training.uplift import evaluate_uplift, uplift_frame

    s = state.settings
    try:
        frame, columns = uplift_frame(s, read_log(s, log_file), read_lines(s), window, s.lists.redemption_tolerance)
        rep = evaluate_uplift(frame, columns, folds=folds)
    except (FileNotFoundError, CampaignLogError, ValueError, OSError) as e:
        _fail(str(e))
    score = rep.pop("score")
    rep["window_days"] = window
    rep["run_id"] = _log_uplift(s, rep, frame, score)
    summary = {k: rep[k] for k in ("rows", "treated", "held_out", "window_days", "run_id")}
    summary |= {"qini (model)": f"{rep['qini']:.5f}", "qini (random: mean, 95th pct)":
                f"{rep['random_qini_mean']:.5f}, {rep['random_qini_p95']:.5f}",
                "beats random": rep["beats_random"], "uplift overall": f"{rep['overall_uplift']:+.1%}"}
    summary |= {f"uplift@{float(k):.0%}": f"{v:+.1%}" for k, v in rep["uplift_at"].items()}
    _report(json_out, "coupon uplift (T-learner, cross-fitted)", summary, rep)


def _log_uplift(settings: Settings, rep: dict[str, Any], frame: Any, score: Any) -> str:
    """The uplift evaluation as an MLflow run (kind ``uplift``): its metrics, the report and every campaign
    member's cross-fitted uplift score."""
    import pandas as pd

    from features.contract import C
    from training.tracking import log_report_run

    metrics = {k: rep[k] for k in ("qini", "random_qini_mean", "random_qini_p95", "overall_uplift", "rows")}
    metrics |= {f"uplift_at_{k}": v for k, v in rep["uplift_at"].items()}
    ranking = pd.DataFrame({C.MEMBER_ID: frame[C.MEMBER_ID].astype(str).to_numpy(),
                            C.CAMPAIGN_ID: frame[C.CAMPAIGN_ID].astype(str).to_numpy(), "uplift_score": score})
    return log_report_run(settings, "uplift", f"uplift {rep['window_days']}d",
                          {"window_days": rep["window_days"], "folds": rep["folds"], "model": "t-learner"},
                          metrics, rep, frames={"uplift_scores": ranking})


@app.command()
def dashboard(
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder (default <home>/outputs/dashboard).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Write the marketers' dashboard page (member growth, RFM and lifecycle flow, campaign effect)."""
    from pipelines.dashboard import build_dashboard
    from training.campaigns import CampaignLogError

    try:
        rep = build_dashboard(state.settings, out_dir)
    except (FileNotFoundError, LookupError, CampaignLogError) as e:
        _fail(str(e))
    summary = {**rep, "charts": ", ".join(rep["charts"])}
    _report(json_out, "dashboard", summary, rep)


@app.command("run-daily")
def run_daily_cmd(
    run_date: Annotated[str | None, typer.Option("--date", help="Run date (default: the day after the last "
                                                 "transaction).")] = None,
    raw: Annotated[Path | None, typer.Option(help="New raw files to append first.")] = None,
    mapping: Annotated[str | None, typer.Option(help="Mapping of --raw (name or YAML).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Ingest, features, online store, scores, lists, dashboard: idempotent for a date; stops at a failure."""
    from pipelines.daily import DailyError, run_daily

    s = state.settings
    day = _parse_date(run_date, "--date") if run_date else None
    try:
        rep = run_daily(s, day, raw, mapping, progress=lambda m: err.print(m, highlight=False))
    except DailyError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(1) from None
    summary = {"date": rep["date"], "status": rep["status"], "manifest": rep["path"]}
    summary |= {name: f"{v['status']} ({v['seconds']} s)" for name, v in rep["steps"].items()}
    _report(json_out, "daily run", summary, rep)


@app.command("settings")
def show_settings(json_out: JsonOpt = False) -> None:
    """Print the effective settings (defaults, file and environment merged)."""
    s = state.settings
    payload = s.model_dump(mode="json")
    if json_out:
        emit_json(payload)
    else:
        import yaml

        out.print(yaml.safe_dump(payload, sort_keys=False), highlight=False)


def run() -> None:  # pragma: no cover - console entry for `python -m pipelines.cli`
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    run()

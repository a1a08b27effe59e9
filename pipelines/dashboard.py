"""``repurchase dashboard``: one self-contained web page for marketers (Plotly, its library inlined, so it
opens with no internet), written whole to ``<outputs>/dashboard/index.html`` beside the numbers it
charts (``data.json``).

Three dashboards, from the lake and the feature snapshots (nothing is recomputed here that a feature
already holds):

- member growth: new members a month by acquisition channel; activation (the share of each month's new
  members with a first purchase within ``lifecycle.new_member_days`` of joining; only members who joined
  that long before the data ends count) and the first-purchase rate so far;
- RFM and lifecycle: members per RFM segment in the latest snapshot; lifecycle stage shares over time
  (one snapshot every ``flow_every`` weeks); the transition matrix between the last two of those snapshots
  (row: the stage then, column: the stage now, values: share of the row);
- campaign effect: each campaign's lift at 7/14/30 days with its 95% interval (training.campaigns).
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from features.contract import C, F
from features.settings import Settings

DASHBOARD_DIR = "dashboard"


def growth(settings: Settings, members: pd.DataFrame, lines: pd.DataFrame) -> dict[str, Any]:
    """New members a month by channel, activation and first-purchase rate by join month."""
    m = members[[C.MEMBER_ID, C.JOINED_AT, C.CHANNEL]].copy()
    m[C.JOINED_AT] = pd.to_datetime(m[C.JOINED_AT], utc=True)
    m[C.CHANNEL] = m[C.CHANNEL].astype("string").fillna("unknown")
    m["month"] = m[C.JOINED_AT].dt.tz_convert(None).dt.to_period("M").astype(str)
    buys = lines[~lines[C.IS_RETURN].fillna(False).astype(bool)]
    first = pd.to_datetime(buys.groupby(C.MEMBER_ID)[C.TS].min(), utc=True)
    m["first_purchase"] = m[C.MEMBER_ID].astype(str).map(first)
    days = (m["first_purchase"] - m[C.JOINED_AT]).dt.total_seconds() / 86400.0
    window = settings.lifecycle.new_member_days
    # activation is known only for members who joined at least the window before the data ends
    end = pd.to_datetime(lines[C.TS], utc=True).max()
    complete = m[C.JOINED_AT] <= end - pd.Timedelta(days=window)
    m["activated"] = (days <= window).astype(float).where(complete)
    m["bought"] = m["first_purchase"].notna()
    by = m.pivot_table(index="month", columns=C.CHANNEL, values=C.MEMBER_ID, aggfunc="count", fill_value=0)
    rates = m.groupby("month").agg(members=(C.MEMBER_ID, "count"), activated=("activated", "mean"),
                                   bought=("bought", "mean"))
    rates["activated"] = rates["activated"].astype(float)
    return {"months": list(by.index), "new_by_channel": {str(c): by[c].astype(int).tolist() for c in by.columns},
            "activation": [None if np.isnan(v) else round(float(v), 4) for v in rates["activated"]],
            "first_purchase_rate": rates["bought"].round(4).tolist(),
            "members": len(m)}


def lifecycle(settings: Settings, flow_every: int = 4) -> dict[str, Any]:
    """RFM segment counts of the latest snapshot, stage shares over time, the last transition matrix."""
    from features.lake import MEMBER_VIEW, snapshot_dates, snapshot_path
    from features.segments import STAGES

    dates = snapshot_dates(settings, MEMBER_VIEW)
    if not dates:
        raise LookupError(f"no member snapshot under {settings.dirs.features}: run `repurchase features build`")
    picked = dates[::-1][::flow_every][::-1]  # every flow_every-th snapshot, ending at the latest
    frames: dict[date, pd.DataFrame] = {}
    for d in picked:
        frames[d] = pd.read_parquet(snapshot_path(settings, MEMBER_VIEW, d.isoformat()),
                                    columns=[C.MEMBER_ID, F.LIFECYCLE_STAGE, F.RFM_SEGMENT])
    latest = frames[picked[-1]]
    segments = latest[F.RFM_SEGMENT].astype("string").fillna("none").value_counts()
    order = [s for s in settings.rfm.segment_names if s in segments.index]
    shares = {s: [] for s in STAGES}
    for d in picked:
        counts = frames[d][F.LIFECYCLE_STAGE].astype("string").value_counts(normalize=True)
        for s in STAGES:
            shares[s].append(round(float(counts.get(s, 0.0)), 4))
    matrix = None
    if len(picked) >= 2:
        before = frames[picked[-2]].set_index(C.MEMBER_ID)[F.LIFECYCLE_STAGE].astype("string")
        now = latest.set_index(C.MEMBER_ID)[F.LIFECYCLE_STAGE].astype("string")
        both = pd.concat({"then": before, "now": now}, axis=1, join="inner").dropna()
        table = pd.crosstab(both["then"], both["now"], normalize="index").reindex(index=list(STAGES),
                                                                                  columns=list(STAGES))
        matrix = {"from": picked[-2].isoformat(), "to": picked[-1].isoformat(), "stages": list(STAGES),
                  "shares": table.round(4).astype(object).where(table.notna(), None).values.tolist(),
                  "members": len(both)}
    return {"as_of": picked[-1].isoformat(), "segments": order, "segment_counts": [int(segments[s]) for s in order],
            "dates": [d.isoformat() for d in picked], "stage_shares": shares, "transition": matrix,
            "members": len(latest)}


def campaigns(settings: Settings, log: pd.DataFrame | None, lines: pd.DataFrame) -> dict[str, Any] | None:
    from training.campaigns import CE, campaign_effects

    if log is None or not len(log):
        return None
    r = campaign_effects(log, lines, windows=settings.lists.windows_days, tolerance=settings.lists.redemption_tolerance)
    return {"windows": list(settings.lists.windows_days), "rows": r[[CE.CAMPAIGN_ID, CE.WINDOW, CE.LIFT, CE.LIFT_LOW,
                                                                     CE.LIFT_HIGH, CE.N_TREATMENT, CE.N_HOLDOUT]]
            .round(5).to_dict(orient="records")}


def _figures(data: dict[str, Any]) -> list[tuple[str, Any]]:
    import plotly.graph_objects as go

    g, lc, cp = data["growth"], data["lifecycle"], data["campaigns"]
    out = []
    fig = go.Figure([go.Bar(name=ch, x=g["months"], y=v) for ch, v in g["new_by_channel"].items()])
    fig.update_layout(barmode="stack", title="New members a month, by channel", yaxis_title="members")
    out.append(("new-members", fig))
    fig = go.Figure([go.Scatter(name=f"activated within {data['new_member_days']} days", x=g["months"],
                                y=g["activation"], mode="lines+markers"),
                     go.Scatter(name="bought at all so far", x=g["months"], y=g["first_purchase_rate"],
                                mode="lines+markers")])
    fig.update_layout(title="Activation and first-purchase rate by join month", yaxis_tickformat=".0%")
    out.append(("activation", fig))
    fig = go.Figure([go.Bar(x=lc["segments"], y=lc["segment_counts"], name="members")])
    fig.update_layout(title=f"RFM segments, {lc['as_of']}", yaxis_title="members")
    out.append(("rfm", fig))
    fig = go.Figure([go.Scatter(name=s, x=lc["dates"], y=v, stackgroup="one", mode="lines")
                     for s, v in lc["stage_shares"].items()])
    fig.update_layout(title="Lifecycle stages over time", yaxis_tickformat=".0%")
    out.append(("stages", fig))
    if lc["transition"] is not None:
        t = lc["transition"]
        fig = go.Figure(go.Heatmap(z=t["shares"], x=t["stages"], y=t["stages"], colorscale="Blues", zmin=0, zmax=1,
                                   text=[[("" if v is None else f"{v:.0%}") for v in row] for row in t["shares"]],
                                   texttemplate="%{text}"))
        fig.update_layout(title=f"Lifecycle flow {t['from']} -> {t['to']} (row: then, column: now)",
                          yaxis_autorange="reversed")
        out.append(("flow", fig))
    if cp is not None:
        rows = pd.DataFrame(cp["rows"])
        traces = []
        for w in cp["windows"]:
            r = rows[rows["window_days"] == w]
            bars = {"type": "data", "symmetric": False, "array": (r["lift_high"] - r["lift"]).tolist(),
                    "arrayminus": (r["lift"] - r["lift_low"]).tolist()}
            traces.append(go.Bar(name=f"{w} days", x=r["campaign_id"].tolist(), y=r["lift"].tolist(), error_y=bars))
        fig = go.Figure(traces)
        fig.update_layout(barmode="group", title="Campaign lift (treatment - holdout repurchase rate), 95% intervals",
                          yaxis_tickformat=".0%")
        out.append(("campaigns", fig))
    return out


def build_dashboard(settings: Settings, out_dir: Path | None = None, flow_every: int = 4) -> dict[str, Any]:
    """Compute the dashboards' numbers and write ``index.html`` and ``data.json`` into ``out_dir`` (default
    ``<outputs>/dashboard``) in one rename. Returns where and what."""
    import plotly.io as pio

    from features.lake import atomic_path
    from training.campaigns import read_lines, read_log
    from training.dataset import read_lake_table

    members = read_lake_table(settings, "members", columns=[C.MEMBER_ID, C.JOINED_AT, C.CHANNEL])
    lines = read_lines(settings)
    lines[C.MEMBER_ID] = lines[C.MEMBER_ID].astype(str)
    try:
        log = read_log(settings)
    except FileNotFoundError:
        log = None
    data = {"growth": growth(settings, members, lines), "lifecycle": lifecycle(settings, flow_every),
            "campaigns": campaigns(settings, log, lines), "new_member_days": settings.lifecycle.new_member_days}
    figures = _figures(data)
    parts = []
    for i, (key, fig) in enumerate(figures):
        fig.update_layout(template="plotly_white", height=420, margin={"t": 60, "l": 60, "r": 20, "b": 50})
        parts.append(f'<section id="{key}">' + pio.to_html(fig, include_plotlyjs=(i == 0), full_html=False,
                                                           div_id=f"chart-{key}") + "</section>")
    html = ("<!doctype html><html><head><meta charset='utf-8'><title>repurchase dashboard</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px}"
            "section{margin-bottom:28px}</style></head><body>"
            f"<h1>repurchase: members, lifecycle, campaigns</h1><p>Snapshot {data['lifecycle']['as_of']}, "
            f"{data['growth']['members']:,} members.</p>" + "".join(parts) + "</body></html>")
    target = out_dir or settings.dirs.outputs / DASHBOARD_DIR
    with atomic_path(Path(target)) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "index.html").write_text(html, encoding="utf-8")
        (tmp / "data.json").write_text(json.dumps(data, indent=2, default=_json_default))
    return {"path": str(Path(target) / "index.html"), "charts": [k for k, _ in figures],
            "as_of": data["lifecycle"]["as_of"], "members": data["growth"]["members"], "bytes": len(html)}


def _json_default(v: Any) -> Any:
    if isinstance(v, np.integer | np.floating):
        return v.item()
    return str(v)

"""``repurchase lists export``: marketer lists from the scores partition, with reasons, suggested items, a
suggested treatment and a random holdout recorded so the campaign can be judged later.

Rows come from ``repurchase score``'s partition of the date (training.scores): nothing is scored here, so
a list and the API agree. Filters (all optional, combined with AND): lifecycle stages, RFM segments, churn
bands, a least expected spend, a replenishable category that is due (the member's own cycle in it:
``cat_due_ratio >= settings.lists.due_ratio`` in the member x category snapshot), and ``top`` N by value at
risk (P(churn) x expected spend). The treatment follows the member, first rule that applies:

1. high value (expected spend in the top ``1 - lists.high_value_quantile`` of all scored members, or an RFM
   segment in ``lists.vip_segments``): ``perks`` (early access, service), not a discount;
2. lifecycle stage ``new``: ``second_order_coupon``;
3. stage ``dormant`` or ``churned``: ``win_back_coupon``;
4. anyone else: ``reminder``.

The holdout: members ordered by sha256 of ``seed:list name:member id``, the first ``round(share x n)`` are
``holdout`` (get nothing), the rest ``treatment``. The same list name, seed and members give the same arms,
whatever order the rows came in. Each export also writes the campaign log of the list (the contract's
``campaigns`` table: campaign_id = list name, member, arm, sent_at) under
``<outputs>/lists/<name>/``, ready for ``repurchase campaigns report`` once purchases after the send are in.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from features.contract import FC, C
from features.segments import STAGES
from features.settings import Settings
from training.campaigns import HOLDOUT, TREATMENT

PERKS, SECOND_ORDER, WIN_BACK, REMINDER = "perks", "second_order_coupon", "win_back_coupon", "reminder"
TREATMENT_WORDS = {PERKS: "perks, early access or service, not a discount (high value)",
                   SECOND_ORDER: "a coupon for the second order (new member)",
                   WIN_BACK: "a win-back coupon (dormant or churned)",
                   REMINDER: "a reminder with the suggested items"}


class L:
    """Columns of an exported list."""

    MEMBER_ID = C.MEMBER_ID
    ARM = C.ARM
    STAGE = "lifecycle_stage"
    SEGMENT = "rfm_segment"
    CHURN_P = "churn_probability"
    BAND = "churn_band"
    REASONS = "churn_reasons"
    VALUE = "expected_spend"
    AT_RISK = "value_at_risk"
    NEXT_PURCHASE = "next_purchase_date"
    REMIND_AT = "remind_at"
    ITEMS = "suggested_items"
    TREATMENT = "suggested_treatment"
    TREATMENT_TEXT = "treatment_note"
    COLUMNS = (MEMBER_ID, ARM, STAGE, SEGMENT, CHURN_P, BAND, REASONS, VALUE, AT_RISK, NEXT_PURCHASE, REMIND_AT,
               ITEMS, TREATMENT, TREATMENT_TEXT)


class ListError(ValueError):
    """A list that cannot be made as asked (the message names the option)."""


@dataclass(frozen=True)
class ListFilters:
    stages: tuple[str, ...] = ()
    segments: tuple[str, ...] = ()
    bands: tuple[str, ...] = ()
    min_value: float | None = None
    category_due: str | None = None
    top: int | None = None


def holdout_arms(member_ids: pd.Series, name: str, share: float, seed: int) -> np.ndarray:
    """``treatment``/``holdout`` per member: the ``round(share x n)`` members first by sha256 of
    ``seed:name:member`` are the holdout (deterministic, independent of row order)."""
    if not 0 <= share < 1:
        raise ListError(f"holdout share must be in [0, 1), got {share}")
    keys = [hashlib.sha256(f"{seed}:{name}:{m}".encode()).hexdigest() for m in member_ids.astype(str)]
    order = np.argsort(np.asarray(keys), kind="stable")
    arms = np.full(len(keys), TREATMENT, dtype=object)
    arms[order[: round(share * len(keys))]] = HOLDOUT
    return arms


def _due_members(settings: Settings, as_of: date, category: str) -> set[str]:
    from features.lake import MEMBER_CATEGORY_VIEW, snapshot_dates, snapshot_path

    if as_of not in snapshot_dates(settings, MEMBER_CATEGORY_VIEW):
        raise ListError(f"--category-due needs the member x category snapshot of {as_of}: run "
                        f"`repurchase features build --as-of {as_of}`")
    cat = pd.read_parquet(snapshot_path(settings, MEMBER_CATEGORY_VIEW, as_of.isoformat()),
                          columns=[C.MEMBER_ID, C.CATEGORY, FC.CAT_DUE_RATIO, FC.CAT_REPLENISHABLE])
    known = set(cat[C.CATEGORY].astype(str))
    if category not in known:
        raise ListError(f"--category-due: no member bought category {category!r} by {as_of} (categories: "
                        f"{', '.join(sorted(known)[:12])}{', ...' if len(known) > 12 else ''})")
    hit = cat[(cat[C.CATEGORY].astype(str) == category) & cat[FC.CAT_REPLENISHABLE].fillna(False).astype(bool)
              & (cat[FC.CAT_DUE_RATIO] >= settings.lists.due_ratio)]
    return set(hit[C.MEMBER_ID].astype(str))


def build_list(settings: Settings, filters: ListFilters, name: str, as_of: date | None = None,
               holdout_share: float | None = None, seed: int | None = None,
               items: int = 3) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(the list, its manifest). Raises :class:`ListError` naming the option that cannot be applied."""
    from training.next_purchase import NP
    from training.recommend import RC
    from training.scores import MEMBERS_FILE, RECS_FILE, SC, np_column, partition, read_manifest, score_dates

    dates = score_dates(settings)
    if not dates:
        raise ListError(f"no scores under {settings.dirs.outputs}: run `repurchase score` first")
    as_of = as_of or dates[-1]
    if as_of not in dates:
        raise ListError(f"--as-of {as_of}: no scores of that date (there are: "
                        f"{', '.join(d.isoformat() for d in dates[-5:])}); run `repurchase score --as-of {as_of}`")
    for s in filters.stages:
        if s not in STAGES:
            raise ListError(f"--stage {s!r}: the stages are {', '.join(STAGES)}")
    for s in filters.segments:
        if s not in settings.rfm.segment_names:
            raise ListError(f"--segment {s!r}: the segments are {', '.join(settings.rfm.segment_names)}")
    bands = list(settings.training.churn_bands)
    for b in filters.bands:
        if b not in bands:
            raise ListError(f"--band {b!r}: the churn bands are {', '.join(bands)}")
    if filters.top is not None and filters.top < 1:
        raise ListError(f"--top must be at least 1, got {filters.top}")
    part = partition(settings, as_of)
    m = pd.read_parquet(part / MEMBERS_FILE)
    high = float(m[SC.VALUE].quantile(settings.lists.high_value_quantile)) if len(m) else np.inf
    keep = pd.Series(True, index=m.index)
    if filters.stages:
        keep &= m[SC.LIFECYCLE_STAGE].isin(filters.stages)
    if filters.segments:
        keep &= m[SC.RFM_SEGMENT].isin(filters.segments)
    if filters.bands:
        keep &= m[SC.CHURN_BAND].isin(filters.bands)
    if filters.min_value is not None:
        keep &= m[SC.VALUE] >= filters.min_value
    if filters.category_due is not None:
        keep &= m[SC.MEMBER_ID].astype(str).isin(_due_members(settings, as_of, filters.category_due))
    sel = m[keep].copy()
    sel[L.AT_RISK] = sel[SC.CHURN_P] * sel[SC.VALUE]
    sel = sel.sort_values([L.AT_RISK, SC.MEMBER_ID], ascending=[False, True], kind="mergesort")
    if filters.top is not None:
        sel = sel.head(filters.top)
    recs = pd.read_parquet(part / RECS_FILE, columns=[RC.MEMBER_ID, RC.RANK, RC.ITEM_ID])
    recs = recs[(recs[RC.RANK] <= items) & recs[RC.MEMBER_ID].isin(set(sel[SC.MEMBER_ID]))]
    suggested = recs.sort_values([RC.MEMBER_ID, RC.RANK]).groupby(RC.MEMBER_ID)[RC.ITEM_ID] \
        .agg(lambda s: ", ".join(map(str, s)))
    vip = sel[SC.VALUE] >= high
    if settings.lists.vip_segments:
        vip |= sel[SC.RFM_SEGMENT].isin(settings.lists.vip_segments)
    stage = sel[SC.LIFECYCLE_STAGE]
    treatment = np.select([vip.to_numpy(), (stage == "new").to_numpy(), stage.isin(["dormant", "churned"]).to_numpy()],
                          [PERKS, SECOND_ORDER, WIN_BACK], REMINDER).astype(object)
    share = settings.lists.holdout_share if holdout_share is None else holdout_share
    seed = settings.lists.seed if seed is None else seed

    def day(days: pd.Series) -> pd.Series:
        return days.map(lambda d: None if pd.isna(d) else (as_of + timedelta(days=int(np.floor(d)))).isoformat())

    out = pd.DataFrame({
        L.MEMBER_ID: sel[SC.MEMBER_ID].astype(str).to_numpy(),
        L.ARM: holdout_arms(sel[SC.MEMBER_ID], name, share, seed),
        L.STAGE: sel[SC.LIFECYCLE_STAGE].to_numpy(), L.SEGMENT: sel[SC.RFM_SEGMENT].to_numpy(),
        L.CHURN_P: sel[SC.CHURN_P].round(4).to_numpy(), L.BAND: sel[SC.CHURN_BAND].to_numpy(),
        L.REASONS: ["; ".join(r) for r in sel[SC.REASONS]],
        L.VALUE: sel[SC.VALUE].round(2).to_numpy(), L.AT_RISK: sel[L.AT_RISK].round(2).to_numpy(),
        L.NEXT_PURCHASE: day(sel[np_column(NP.EXPECTED_DAYS)]).to_numpy(),
        L.REMIND_AT: day(sel[np_column(NP.REMIND_DAYS)]).to_numpy(),
        L.ITEMS: sel[SC.MEMBER_ID].map(suggested).fillna("").to_numpy(),
        L.TREATMENT: treatment, L.TREATMENT_TEXT: [TREATMENT_WORDS[t] for t in treatment]})
    manifest = {"name": name, "as_of": as_of.isoformat(), "filters": {k: v for k, v in asdict(filters).items()
                                                                       if v not in ((), None, {})},
                "holdout_share": share, "seed": seed, "members": len(out),
                "holdout": int((out[L.ARM] == HOLDOUT).sum()), "treatments": out[L.TREATMENT].value_counts()
                .to_dict(), "high_value_threshold": round(high, 2), "models": read_manifest(settings, as_of)
                ["versions"]}
    return out, manifest


def export_list(settings: Settings, frame: pd.DataFrame, manifest: dict[str, Any], out: Path,
                sent_at: datetime | None = None) -> dict[str, Any]:
    """Write ``frame`` to ``out`` (.csv or .xlsx, in one rename) and the list's campaign log and manifest under
    ``<outputs>/lists/<name>/``; return the manifest with the paths."""
    from features.lake import atomic_path

    suffix = out.suffix.lower()
    if suffix not in (".csv", ".xlsx"):
        raise ListError(f"--out {out}: write .csv or .xlsx")
    name = manifest["name"]
    sent = sent_at or datetime.now(UTC).replace(microsecond=0)
    log = pd.DataFrame({C.CAMPAIGN_ID: name, C.MEMBER_ID: frame[L.MEMBER_ID], C.ARM: frame[L.ARM],
                        C.SENT_AT: pd.Timestamp(sent).tz_convert("UTC") if pd.Timestamp(sent).tzinfo
                        else pd.Timestamp(sent, tz="UTC"),
                        "suggested_treatment": frame[L.TREATMENT]})
    record = settings.dirs.outputs / "lists" / name
    body = {**manifest, "sent_at": pd.Timestamp(log[C.SENT_AT].iloc[0]).isoformat() if len(log) else None,
            "file": str(out)}
    with atomic_path(out) as tmp:
        if suffix == ".csv":
            frame.to_csv(tmp, index=False)
        else:
            with pd.ExcelWriter(tmp, engine="openpyxl") as xl:
                frame.to_excel(xl, sheet_name="list", index=False)
                pd.DataFrame({"key": list(body), "value": [json.dumps(v, default=str) for v in body.values()]}) \
                    .to_excel(xl, sheet_name="about", index=False)
    with atomic_path(record) as tmp:
        tmp.mkdir(parents=True)
        log.to_parquet(tmp / "campaign_log.parquet", index=False)
        (tmp / "manifest.json").write_text(json.dumps(body, indent=2, sort_keys=True, default=str))
    return {**body, "campaign_log": str(record / "campaign_log.parquet")}

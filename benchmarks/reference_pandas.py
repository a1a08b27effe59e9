"""A plain pandas implementation of the feature definitions of ``features.compute``.

Used only as the reference of ``benchmarks/feature_computation.py`` and as an independent cross-check in
``tests/features/test_compute.py``; nothing in the service imports it. It follows the definitions in the
docstrings of ``features.compute`` and ``features.segments`` line by line, written separately, so that a
mistake has to be made twice to go unnoticed.
"""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from features.compute import UNKNOWN_CATEGORY, view_schema
from features.contract import FC, FI, C, F
from features.lake import ITEM_VIEW, MEMBER_CATEGORY_VIEW, MEMBER_VIEW, table_dir
from features.segments import Stage
from features.settings import Settings

DAY = 86_400_000_000
US = pd.Timedelta(microseconds=1)


def read_lake(settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """transactions, members, items of the lake as pandas frames (contract columns only)."""
    tx = pq.read_table(table_dir(settings, "transactions"), partitioning="hive").to_pandas()
    tx = tx.drop(columns=[c for c in tx.columns if c == "month"])
    members = pq.read_table(table_dir(settings, "members")).to_pandas()
    items = pq.read_table(table_dir(settings, "items")).to_pandas()
    return tx, members, items


def _ratio(num: pd.Series, den: pd.Series) -> pd.Series:
    num, den = num.astype(float), den.astype(float)
    return (num / den.where(den > 0)).where(den > 0)


def _gaps(times: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    t = times[[*keys, "age"]].drop_duplicates().sort_values([*keys, "age"])
    g = t.groupby(keys, sort=False)["age"]
    t["gap"] = (g.shift(-1) - t["age"]).astype(float)
    t["rn"] = g.cumcount()
    agg = t.groupby(keys).agg(gap_mean=("gap", "mean"), gap_std=("gap", "std"))
    agg["last_gap"] = t[t["rn"] == 0].set_index(keys)["gap"]
    return agg


def _scores(value: pd.Series, ranked: pd.Series, bins: int, descending: bool) -> pd.Series:
    v = value[ranked]
    rk = (-v if descending else v).rank(method="min")
    score = np.minimum(bins, 1 + np.floor((rk - 1) * bins / len(v)))
    return score.reindex(value.index).fillna(0).astype("int64")


def _segments(out: pd.DataFrame, rfm_orders: pd.Series, rfm_spend: pd.Series, last_gap: pd.Series,
              settings: Settings) -> pd.DataFrame:
    rfm, life = settings.rfm, settings.lifecycle
    ranked = rfm_orders > 0
    out[F.RFM_R] = _scores(out[F.RECENCY_DAYS], ranked, rfm.bins, descending=True)
    out[F.RFM_F] = _scores(rfm_orders.astype(float), ranked, rfm.bins, descending=False)
    out[F.RFM_M] = _scores(rfm_spend, ranked, rfm.bins, descending=False)
    r, f, m = (out[c].clip(lower=1) for c in (F.RFM_R, F.RFM_F, F.RFM_M))
    new = out[F.TENURE_DAYS] <= life.new_member_days
    conds = [new, out[F.ORDERS_TOTAL] == 0]
    names = [rfm.new_segment, rfm.no_purchase_segment]
    for s in rfm.segments:
        conds.append(r.between(*s.r) & f.between(*s.f) & m.between(*s.m))
        names.append(s.name)
    out[F.RFM_SEGMENT] = np.select(conds, names, default=None)
    inactive = out[F.RECENCY_DAYS].fillna(out[F.TENURE_DAYS].astype(float))
    out[F.LIFECYCLE_STAGE] = np.select(
        [new, inactive >= life.churned_days, inactive >= life.dormant_days,
         (out[F.RECENCY_DAYS] <= life.reactivated_days) & (last_gap >= life.dormant_days)],
        [Stage.NEW, Stage.CHURNED, Stage.DORMANT, Stage.REACTIVATED], default=Stage.ACTIVE)
    return out


def _lines(tx: pd.DataFrame, items: pd.DataFrame, d: pd.Timestamp) -> pd.DataFrame:
    lines = tx[tx[C.TS] < d].merge(items[[C.ITEM_ID, C.CATEGORY, C.REPLENISHABLE]], on=C.ITEM_ID,
                                   how="left", suffixes=("", "_item"))
    lines[C.CATEGORY] = lines[C.CATEGORY].fillna(lines[C.CATEGORY + "_item"]).fillna(UNKNOWN_CATEGORY)
    lines[C.DISCOUNT] = lines[C.DISCOUNT].fillna(0.0) if C.DISCOUNT in lines else 0.0
    lines[C.IS_RETURN] = lines[C.IS_RETURN].fillna(False).astype(bool) if C.IS_RETURN in lines else False
    lines["repl"] = lines[C.REPLENISHABLE].fillna(False).astype(bool)
    lines["age"] = (d - lines[C.TS]) // US
    return lines


def reference_views(tx: pd.DataFrame, members: pd.DataFrame, items: pd.DataFrame, as_of: date,
                    settings: Settings) -> dict[str, pd.DataFrame]:
    """The three snapshot views as of ``as_of``, sorted like features.compute writes them."""
    d = pd.Timestamp(as_of.isoformat(), tz="UTC")
    m, o, cat, amt = C.MEMBER_ID, C.ORDER_ID, C.CATEGORY, C.AMOUNT
    lines = _lines(tx, items, d)
    base = members[members[C.JOINED_AT] < d].set_index(m)
    base_age = (d - base[C.JOINED_AT]) // US
    purchase = lines[~lines[C.IS_RETURN] & lines[m].isin(base.index)]
    mco = purchase.groupby([m, o, cat]).agg(age=("age", "max"), amount=(amt, "sum"),
                                            n_items=(C.ITEM_ID, "nunique")).reset_index()
    orders = mco.groupby([m, o]).agg(age=("age", "max"), amount=("amount", "sum"),
                                     n_items=("n_items", "sum")).reset_index()
    og = orders.groupby(m)
    windows = settings.features.windows_days
    out = pd.DataFrame(index=base.index)
    out[C.AS_OF] = d
    out[F.TENURE_DAYS] = (base_age // DAY).astype("int64")
    recency_us = og["age"].min().reindex(base.index)
    out[F.RECENCY_DAYS] = recency_us / DAY
    out[F.FIRST_PURCHASE_DAYS] = og["age"].max().reindex(base.index) / DAY
    n_orders = og.size().reindex(base.index).fillna(0).astype("int64")
    out[F.ORDERS_TOTAL] = n_orders

    def per_member(frame: pd.DataFrame, mask: pd.Series, col: str | None) -> pd.Series:
        sel = frame[mask]
        s = sel.groupby(m).size() if col is None else sel.groupby(m)[col].sum()
        return s.reindex(base.index).fillna(0)

    for w in windows:
        out[F.orders(w)] = per_member(orders, orders["age"] <= w * DAY, None).astype("int64")
    all_true = pd.Series(True, index=lines.index)
    for w in windows:
        out[F.spend(w)] = per_member(lines, lines["age"] <= w * DAY, amt).astype(float)
    spend_total = per_member(lines, all_true, amt).astype(float)
    out.insert(out.columns.get_loc(F.orders(windows[0])), F.SPEND_TOTAL, spend_total)
    purchased = per_member(lines, ~lines[C.IS_RETURN], amt)
    out[F.AVG_ORDER_VALUE] = _ratio(og["amount"].sum().reindex(base.index), n_orders)
    gaps = _gaps(orders, [m]).reindex(base.index)
    out[F.GAP_MEAN_DAYS] = gaps["gap_mean"] / DAY
    out[F.GAP_STD_DAYS] = gaps["gap_std"] / DAY
    out[F.RECENCY_GAP_RATIO] = _ratio(recency_us, gaps["gap_mean"])
    prev = per_member(lines, (lines["age"] > 90 * DAY) & (lines["age"] <= 180 * DAY), amt)
    last90 = per_member(lines, lines["age"] <= 90 * DAY, amt)
    out[F.SPEND_PREV_90D] = prev.astype(float)
    out[F.SPEND_TREND_90D] = (last90 / prev.where(prev > 0) - 1).where(prev > 0)
    out[F.BASKET_SIZE_MEAN] = og["n_items"].mean().reindex(base.index)
    mc = mco.groupby([m, cat])["amount"].sum().reset_index()
    mc["total"] = mc.groupby(m)["amount"].transform("sum")
    out[F.N_CATEGORIES] = mc.groupby(m).size().reindex(base.index).fillna(0).astype("int64")
    top = mc.sort_values([m, "amount", cat], ascending=[True, False, True]).groupby(m).head(1).set_index(m)
    out[F.TOP_CATEGORY] = top[cat].reindex(base.index)
    out[F.TOP_CATEGORY_SHARE] = _ratio(top["amount"], top["total"]).reindex(base.index)
    p = (mc["amount"] / mc["total"]).where((mc["amount"] > 0) & (mc["total"] > 0))
    ent = (-(p * np.log(p))).fillna(0).groupby(mc[m]).sum()
    out[F.CATEGORY_ENTROPY] = ent.where(top["total"].reindex(ent.index) > 0).reindex(base.index)
    discount = per_member(lines, ~lines[C.IS_RETURN], C.DISCOUNT)
    out[F.DISCOUNT_SHARE] = _ratio(discount, purchased + discount)
    returned = per_member(lines.assign(_neg=-lines[amt]), lines[C.IS_RETURN], "_neg")
    out[F.RETURN_SHARE] = _ratio(returned, purchased)
    repl = per_member(lines, ~lines[C.IS_RETURN] & lines["repl"], amt)
    out[F.REPLENISHABLE_SHARE] = _ratio(repl, purchased)
    rfm_w = settings.rfm.window_days * DAY
    rfm_orders = per_member(orders, orders["age"] <= rfm_w, None)
    rfm_spend = per_member(lines, lines["age"] <= rfm_w, amt)
    last_gap = gaps["last_gap"].fillna(base_age - recency_us) / DAY
    out = _segments(out, rfm_orders, rfm_spend, last_gap, settings)
    out[F.CHANNEL] = base[C.CHANNEL]
    member = out.reset_index().sort_values(m, ignore_index=True)
    member = member[list(view_schema(settings, MEMBER_VIEW))]

    # member x category
    c = mco.groupby([m, cat]).agg(**{FC.CAT_ORDERS: ("age", "size"), "amount": ("amount", "sum"),
                                     "recency": ("age", "min")})
    c["total"] = c.groupby(level=m)["amount"].transform("sum")
    cg = _gaps(mco, [m, cat])
    flags = items[C.REPLENISHABLE].fillna(False).astype(bool)
    cat_repl = flags.groupby(items[C.CATEGORY]).any()
    mcat = pd.DataFrame({
        FC.CAT_ORDERS: c[FC.CAT_ORDERS].astype("int64"),
        FC.CAT_SPEND_SHARE: _ratio(c["amount"], c["total"]),
        FC.CAT_RECENCY_DAYS: c["recency"] / DAY,
        FC.CAT_GAP_MEAN_DAYS: cg["gap_mean"] / DAY,
        FC.CAT_GAP_STD_DAYS: cg["gap_std"] / DAY,
        FC.CAT_DUE_RATIO: _ratio(c["recency"], cg["gap_mean"]),
    }).reset_index()
    mcat[FC.CAT_REPLENISHABLE] = mcat[cat].map(cat_repl).fillna(False).astype(bool)
    mcat[C.AS_OF] = d
    mcat = mcat.sort_values([m, cat], ignore_index=True)[list(view_schema(settings, MEMBER_CATEGORY_VIEW))]

    # items
    pl = lines[~lines[C.IS_RETURN]]
    imo = pl.groupby([C.ITEM_ID, m, o]).agg(age=("age", "max")).reset_index()
    imo["in90"] = imo["age"] <= 90 * DAY
    im = imo.groupby([C.ITEM_ID, m]).agg(n=("age", "size"), age=("age", "min"), n90=("in90", "sum"))
    im = im.reset_index()
    im["in30"] = im["age"] <= 30 * DAY
    im["repeat"] = im["n"] > 1
    ia = im.groupby(C.ITEM_ID).agg(buyers30=("in30", "sum"), orders90=("n90", "sum"), buyers=("n", "size"),
                                   repeaters=("repeat", "sum"))
    ia["cat"] = pl.groupby(C.ITEM_ID)[cat].max()  # string max: per item only (pure Python in pandas)
    cat_items = items.set_index(C.ITEM_ID)
    ids = cat_items.index.union(ia.index)
    ia, cat_items = ia.reindex(ids), cat_items.reindex(ids)
    item = pd.DataFrame({
        C.ITEM_ID: ids, C.AS_OF: d,
        FI.ITEM_BUYERS_30D: ia["buyers30"].fillna(0).astype("int64").to_numpy(),
        FI.ITEM_ORDERS_90D: ia["orders90"].fillna(0).astype("int64").to_numpy(),
        FI.ITEM_REPEAT_RATE: _ratio(ia["repeaters"], ia["buyers"]).to_numpy(),
        FI.ITEM_PRICE: cat_items[C.PRICE].astype(float).to_numpy(),
        FI.ITEM_CATEGORY: cat_items[C.CATEGORY].fillna(ia["cat"]).to_numpy(),
        FI.ITEM_REPLENISHABLE: cat_items[C.REPLENISHABLE].fillna(False).astype(bool).to_numpy(),
    }).sort_values(C.ITEM_ID, ignore_index=True)
    return {MEMBER_VIEW: member, MEMBER_CATEGORY_VIEW: mcat, ITEM_VIEW: item}

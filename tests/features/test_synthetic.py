"""The demo-data generator: determinism, the contract, integrity, and the planted truth found in the data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features import synthetic
from features.contract import ARM_HOLDOUT, ARM_TREATMENT, CAMPAIGNS, ITEMS, MEMBERS, TRANSACTIONS, C, Table
from features.synthetic import POOLED_CAMPAIGN, DemoSummary, T, generate_demo_data

ARROW = {"string": pa.string(), "timestamp": pa.timestamp("us", tz="UTC"), "float": pa.float64(),
         "int": pa.int64(), "bool": pa.bool_()}


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoSummary, dict[str, pd.DataFrame]]:
    out = tmp_path_factory.mktemp("demo")
    summary = generate_demo_data(out, members=4_000, seed=11)
    frames = {
        "tx": pd.read_parquet(out / synthetic.TRANSACTIONS_DIR),
        "members": pd.read_parquet(out / "members.parquet"),
        "items": pd.read_parquet(out / "items.parquet"),
        "campaigns": pd.read_parquet(out / "campaigns.parquet"),
        "truth_members": pd.read_parquet(out / "truth" / "members.parquet"),
        "truth_repl": pd.read_parquet(out / "truth" / "replenishment.parquet"),
        "truth_assoc": pd.read_parquet(out / "truth" / "associations.parquet"),
    }
    return summary, frames


def test_same_seed_same_files_other_seed_other_data(tmp_path: Path) -> None:
    a = generate_demo_data(tmp_path / "a", members=1_500, seed=3)
    b = generate_demo_data(tmp_path / "b", members=1_500, seed=3)
    c = generate_demo_data(tmp_path / "c", members=1_500, seed=4)
    digest_a = _digest(tmp_path / "a")
    assert digest_a == _digest(tmp_path / "b")
    assert "transactions/part-00000.parquet" in digest_a and "truth/truth.json" in digest_a
    assert (a.orders, a.lines) == (b.orders, b.lines)
    assert (c.orders, c.lines) != (a.orders, a.lines)
    part = "transactions/part-00000.parquet"
    assert _digest(tmp_path / "c")[part] != digest_a[part]


def test_rerun_replaces_outputs(tmp_path: Path) -> None:
    generate_demo_data(tmp_path, members=1_500, seed=1)
    first = _digest(tmp_path)
    generate_demo_data(tmp_path, members=1_500, seed=1)
    assert _digest(tmp_path) == first
    assert not [p for p in tmp_path.rglob(".*tmp-*")]


@pytest.mark.parametrize(("name", "table"), [("transactions/part-00000.parquet", TRANSACTIONS),
                                             ("members.parquet", MEMBERS), ("items.parquet", ITEMS),
                                             ("campaigns.parquet", CAMPAIGNS)])
def test_schema_matches_contract(demo, name: str, table: Table) -> None:
    summary, _ = demo
    schema = pq.read_schema(summary.out_dir / name)
    assert tuple(schema.names) == table.names
    for col in table.columns:
        assert schema.field(col.name).type == ARROW[col.dtype], col.name


def test_truth_timestamps_are_utc_microseconds(demo) -> None:
    summary, _ = demo
    truth = summary.out_dir / "truth"
    for name, col in [("members", T.DROPOUT_AT), ("replenishment", T.FIRST_DUE_AT),
                      ("campaign_effects", T.SENT_AT)]:
        assert pq.read_schema(truth / f"{name}.parquet").field(col).type == ARROW["timestamp"], name


def test_summary_counts_match_files(demo) -> None:
    summary, f = demo
    tx = f["tx"]
    assert summary.members == len(f["members"]) == 4_000
    assert summary.lines == len(tx)
    assert summary.return_lines == int(tx[C.IS_RETURN].sum())
    assert summary.orders == tx[C.ORDER_ID].nunique()
    assert summary.items == len(f["items"])
    assert summary.campaign_rows == len(f["campaigns"])
    assert (summary.start, summary.end) == ("2023-01-01", "2024-12-31")
    assert tx[C.TS].min() >= pd.Timestamp("2023-01-01", tz="UTC")
    assert tx[C.TS].max() < pd.Timestamp("2024-12-31", tz="UTC")
    # about 20 lines a member at the default 730 days
    assert 14 < len(tx) / summary.members < 26
    truth = json.loads((summary.out_dir / "truth" / synthetic.TRUTH_JSON).read_text())
    assert truth["counts"]["lines"] == summary.lines and truth["seed"] == 11


def test_ids_are_strings_and_keys_unique(demo) -> None:
    _, f = demo
    tx, members, items, camp = f["tx"], f["members"], f["items"], f["campaigns"]
    assert members[C.MEMBER_ID].is_unique and items[C.ITEM_ID].is_unique
    assert not tx.duplicated(list(TRANSACTIONS.key)).any()
    assert not camp.duplicated(list(CAMPAIGNS.key)).any()
    assert members[C.MEMBER_ID].str.fullmatch(r"M\d{7}").all()
    assert items[C.ITEM_ID].str.fullmatch(r"I\d{5}").all()
    assert tx[C.ORDER_ID].str.fullmatch(r"O\d{9}").all()
    # member IDs follow the join order
    assert members[C.JOINED_AT].is_monotonic_increasing
    # one order is one member's basket at one time
    purchases = tx[~tx[C.IS_RETURN]]
    distinct = purchases[[C.ORDER_ID, C.MEMBER_ID, C.TS]].drop_duplicates()
    assert distinct[C.ORDER_ID].is_unique


def test_every_line_refers_to_known_member_and_item_after_joining(demo) -> None:
    _, f = demo
    tx = f["tx"].merge(f["members"][[C.MEMBER_ID, C.JOINED_AT]], on=C.MEMBER_ID, how="left")
    assert tx[C.JOINED_AT].notna().all()
    assert (tx[C.TS] >= tx[C.JOINED_AT]).all()
    assert tx[C.ITEM_ID].isin(f["items"][C.ITEM_ID]).all()
    item_cat = f["items"].set_index(C.ITEM_ID)[C.CATEGORY]
    assert (tx[C.CATEGORY].to_numpy() == item_cat.loc[tx[C.ITEM_ID]].to_numpy()).all()
    assert f["campaigns"][C.MEMBER_ID].isin(f["members"][C.MEMBER_ID]).all()
    camp = f["campaigns"].merge(f["members"], on=C.MEMBER_ID)
    assert (camp[C.SENT_AT] > camp[C.JOINED_AT]).all()


def test_money_and_returns(demo) -> None:
    _, f = demo
    tx = f["tx"]
    buy, ret = tx[~tx[C.IS_RETURN]], tx[tx[C.IS_RETURN]]
    assert (buy[C.QUANTITY] >= 1).all() and (buy[C.AMOUNT] >= 0).all() and (tx[C.DISCOUNT] >= 0).all()
    assert 0.005 < len(ret) / len(tx) < 0.05
    assert (ret[C.QUANTITY] < 0).all() and (ret[C.AMOUNT] < 0).all() and (ret[C.DISCOUNT] == 0).all()
    # a return carries its purchase's order id and reverses that line, later
    pair = ret.merge(buy, on=[C.ORDER_ID, C.ITEM_ID], suffixes=("_r", "_b"), validate="one_to_one")
    assert len(pair) == len(ret)
    assert np.allclose(pair[f"{C.QUANTITY}_r"], -pair[f"{C.QUANTITY}_b"])
    assert np.allclose(pair[f"{C.AMOUNT}_r"], -pair[f"{C.AMOUNT}_b"])
    assert (pair[f"{C.TS}_r"] > pair[f"{C.TS}_b"]).all()
    # price bands: the line total before discount is quantity x list price
    price = f["items"].set_index(C.ITEM_ID)[C.PRICE]
    gross = buy[C.QUANTITY] * price.loc[buy[C.ITEM_ID]].to_numpy()
    assert np.allclose(buy[C.AMOUNT] + buy[C.DISCOUNT], gross, atol=0.011)
    assert 0.05 < (buy[C.DISCOUNT] > 0).mean() < 0.4


def test_members_channels_trend_and_never_buyers(demo) -> None:
    _, f = demo
    members, truth = f["members"], f["truth_members"]
    assert set(members[C.CHANNEL]) == {"store", "web", "app", "referral"}
    mid = pd.Timestamp("2024-01-01", tz="UTC")
    assert (members[C.JOINED_AT] >= mid).sum() > 1.3 * (members[C.JOINED_AT] < mid).sum()
    buyers = set(f["tx"][C.MEMBER_ID])
    never = truth.loc[truth[T.NEVER_BUYS], C.MEMBER_ID]
    assert 0.05 < len(never) / len(truth) < 0.3
    assert not never.isin(buyers).any()
    by_channel = truth.groupby(T.CHANNEL)[T.NEVER_BUYS].mean()
    assert by_channel["web"] > by_channel["store"]


def test_cake_buyers_also_buy_candles(demo) -> None:
    _, f = demo
    buy = f["tx"].loc[~f["tx"][C.IS_RETURN], [C.ORDER_ID, C.CATEGORY]].drop_duplicates()
    orders_with = {cat: pd.Index(g) for cat, g in buy.groupby(C.CATEGORY)[C.ORDER_ID]}
    truth = f["truth_assoc"].set_index([T.ANTECEDENT, T.CONSEQUENT])
    for (a, b), row in truth.iterrows():
        with_a = orders_with[a]
        observed = with_a.isin(orders_with[b]).mean()
        assert len(with_a) > 500
        assert observed == pytest.approx(row[T.PLANTED_PROB], abs=0.05), (a, b)
        assert observed == pytest.approx(row[T.OBSERVED_PROB], abs=1e-9), (a, b)
    assert truth.loc[("cake", "candles"), T.PLANTED_PROB] == 0.6
    # candles without cake are rare: the pair has a high lift
    n_orders = buy[C.ORDER_ID].nunique()
    assert len(orders_with["candles"]) / n_orders < 0.1


def test_replenishers_buy_on_their_cycle(demo) -> None:
    _, f = demo
    buy = f["tx"][~f["tx"][C.IS_RETURN]]
    repl = f["truth_repl"]
    assert set(repl[C.CATEGORY]) == {"baby_formula", "diapers", "coffee", "pet_food", "detergent", "shampoo"}
    formula = repl.loc[repl[C.CATEGORY] == "baby_formula", T.CYCLE_DAYS]
    assert formula.mean() == pytest.approx(21, abs=1.0) and formula.std() == pytest.approx(2, abs=0.7)
    lines = buy.merge(repl, on=[C.MEMBER_ID, C.CATEGORY]).drop_duplicates([C.ORDER_ID, C.CATEGORY])
    lines = lines.sort_values([C.MEMBER_ID, C.CATEGORY, C.TS])
    lines["gap"] = lines.groupby([C.MEMBER_ID, C.CATEGORY])[C.TS].diff().dt.total_seconds() / 86_400
    g = lines.groupby([C.MEMBER_ID, C.CATEGORY]).agg(med=("gap", "median"), n=("gap", "count"),
                                                      cycle=(T.CYCLE_DAYS, "first"))
    g = g[g["n"] >= 3]
    assert len(g) > 200
    err = (g["med"] - g["cycle"]).abs()
    assert (err < 2.0).mean() > 0.9
    assert err.median() < 1.0
    items = f["items"].set_index(C.CATEGORY)[C.REPLENISHABLE].groupby(level=0).first()
    assert items["coffee"] and not items["cake"]


def test_no_purchase_after_dropout(demo) -> None:
    _, f = demo
    buy = f["tx"][~f["tx"][C.IS_RETURN]]
    truth = f["truth_members"].set_index(C.MEMBER_ID)
    last = buy.groupby(C.MEMBER_ID)[C.TS].max()
    assert (last <= truth.loc[last.index, T.DROPOUT_AT]).all()
    # returns too stop at dropout
    last_any = f["tx"].groupby(C.MEMBER_ID)[C.TS].max()
    assert (last_any <= truth.loc[last_any.index, T.DROPOUT_AT]).all()
    buyers = truth[~truth[T.NEVER_BUYS]]
    dropped = buyers[T.DROPPED_OUT]
    assert 0.2 < dropped.mean() < 0.8
    assert (buyers.loc[dropped, T.DROPOUT_AT] < pd.Timestamp("2024-12-31", tz="UTC")).all()


def test_hazard_drives_churn(demo) -> None:
    _, f = demo
    truth = f["truth_members"]
    buyers = truth[~truth[T.NEVER_BUYS]]
    # the higher the planted hazard, the likelier a dropout by the end (rank correlation through an AUC)
    y = buyers[T.DROPPED_OUT].to_numpy()
    ranks = buyers[T.HAZARD].rank().to_numpy()
    auc = (ranks[y].sum() - y.sum() * (y.sum() + 1) / 2) / (y.sum() * (~y).sum())
    assert auc > 0.6
    hazard = buyers.groupby(T.CHANNEL)[T.HAZARD].median()
    assert hazard["referral"] < hazard["store"] and hazard["app"] < hazard["web"]
    assert buyers.loc[buyers[T.EARLY_RETURNER], T.HAZARD].median() > buyers[T.HAZARD].median()
    assert buyers.loc[buyers[T.DEAL_SEEKER], T.HAZARD].median() > buyers[T.HAZARD].median()
    # early returners' first order really had a return
    tx = f["tx"]
    first = tx[~tx[C.IS_RETURN]].sort_values(C.TS).groupby(C.MEMBER_ID)[C.ORDER_ID].first()
    returned = set(tx.loc[tx[C.IS_RETURN], C.ORDER_ID])
    early = buyers.loc[buyers[T.EARLY_RETURNER], C.MEMBER_ID]
    early = early[early.isin(first.index)]
    hit = first.loc[early].isin(returned).mean()
    base = first.isin(returned).mean()
    assert hit > 0.7 > base


def test_weekday_and_december_seasonality(demo) -> None:
    _, f = demo
    orders = f["tx"][~f["tx"][C.IS_RETURN]].groupby(C.ORDER_ID)[C.TS].first()
    dow = orders.dt.dayofweek.value_counts(normalize=True)
    assert dow[5] > dow[1] * 1.2  # Saturday over Tuesday
    in_2024 = orders[orders.dt.year == 2024]
    per_day = in_2024.dt.month.value_counts() / in_2024.dt.days_in_month.groupby(in_2024.dt.month).first()
    assert per_day[12] > per_day[11] and per_day[12] > per_day[10]


def test_several_parts_when_blocks_exceed_the_part_size(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(synthetic, "BLOCK_MEMBERS", 500)
    monkeypatch.setattr(synthetic, "PART_MAX_ROWS", 25_000)
    summary = generate_demo_data(tmp_path, members=3_000, seed=5)
    parts = sorted((tmp_path / synthetic.TRANSACTIONS_DIR).glob("part-*.parquet"))
    assert len(parts) >= 2
    rows = [pq.read_metadata(p).num_rows for p in parts]
    assert all(r <= 25_000 for r in rows) and sum(rows) == summary.lines
    tx = pd.read_parquet(tmp_path / synthetic.TRANSACTIONS_DIR)
    assert tx[C.ORDER_ID].nunique() == summary.orders
    assert not tx.duplicated(list(TRANSACTIONS.key)).any()
    assert pd.read_parquet(tmp_path / "members.parquet")[C.MEMBER_ID].is_unique


@pytest.mark.parametrize(("kwargs", "word"), [({"members": 0}, "members"), ({"days": 10}, "days"),
                                              ({"start": "yesterday"}, "start")])
def test_bad_arguments_are_named(tmp_path: Path, kwargs: dict, word: str) -> None:
    args = {"members": 100, **kwargs}
    with pytest.raises(ValueError, match=word):
        generate_demo_data(tmp_path, **args)


@pytest.mark.slow
def test_coupon_effect_is_recovered_by_treatment_vs_holdout(tmp_path: Path) -> None:
    summary = generate_demo_data(tmp_path, members=20_000, seed=2)
    camp = pd.read_parquet(tmp_path / "campaigns.parquet")
    tx = pd.read_parquet(tmp_path / synthetic.TRANSACTIONS_DIR, columns=[C.MEMBER_ID, C.TS, C.IS_RETURN])
    effects = pd.read_parquet(tmp_path / "truth" / "campaign_effects.parquet").set_index(T.CAMPAIGN_ID)
    assert summary.campaign_rows == len(camp)
    assert (camp[C.ARM] == ARM_HOLDOUT).mean() == pytest.approx(synthetic.HOLDOUT_SHARE, abs=0.015)
    assert camp.loc[camp[C.ARM] == ARM_HOLDOUT, C.COUPON].isna().all()
    assert camp.loc[camp[C.ARM] == ARM_TREATMENT, C.COUPON_VALUE].gt(0).all()

    buy = tx[~tx[C.IS_RETURN]]
    joined = camp.merge(buy, on=C.MEMBER_ID, how="left")
    window_end = joined[C.SENT_AT] + pd.Timedelta(days=14)
    in_window = (joined[C.TS] > joined[C.SENT_AT]) & (joined[C.TS] <= window_end)
    hit = in_window.groupby([joined[C.CAMPAIGN_ID], joined[C.MEMBER_ID]]).any()
    camp = camp.set_index([C.CAMPAIGN_ID, C.MEMBER_ID]).assign(hit=hit)
    rates = camp.groupby(C.ARM)["hit"].mean()
    observed = rates[ARM_TREATMENT] - rates[ARM_HOLDOUT]
    planted = effects.loc[POOLED_CAMPAIGN, T.uplift_abs(14)]
    assert planted > 0.03
    assert observed == pytest.approx(planted, abs=0.025)
    # the truth's own rates agree with what the files say
    assert effects.loc[POOLED_CAMPAIGN, T.rate_treatment(14)] == pytest.approx(rates[ARM_TREATMENT], abs=1e-9)
    assert effects.loc[POOLED_CAMPAIGN, T.rate_holdout(14)] == pytest.approx(rates[ARM_HOLDOUT], abs=1e-9)
    assert (effects[T.uplift_abs(7)] > 0).all()

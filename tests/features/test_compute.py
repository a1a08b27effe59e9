"""Member, member x category and item features: exact values, the point-in-time rule, the pandas reference."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from benchmarks.feature_computation import random_lake_frames, write_lake
from benchmarks.reference_pandas import reference_views
from features.compute import (
    arrow_schema,
    compute_features,
    compute_views,
    default_snapshot_dates,
    feature_sql,
    feature_steps,
    lake_connection,
    member_features_frame,
)
from features.contract import FC, FI, C, F
from features.lake import FEATURE_VIEWS, ITEM_VIEW, MEMBER_CATEGORY_VIEW, MEMBER_VIEW, snapshot_path
from tests.conftest import make_settings

D = date(2024, 7, 1)
DT = datetime(2024, 7, 1, tzinfo=UTC)


def _line(member: str, order: str, days_before: float, item: str, amount: float, discount: float = 0.0,
          is_return: bool = False, category: str | None = None) -> dict:
    return {C.MEMBER_ID: member, C.ORDER_ID: order, C.TS: DT - timedelta(days=days_before), C.ITEM_ID: item,
            C.CATEGORY: category, C.QUANTITY: -1.0 if is_return else 1.0, C.AMOUNT: amount,
            C.DISCOUNT: discount, C.IS_RETURN: is_return}


def three_members() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A (long-standing buyer with a return), B (new, one order), C (never bought); X joins on D."""
    items = pd.DataFrame({C.ITEM_ID: ["I1", "I2", "I3", "I4"], C.CATEGORY: ["a", "b", "b", "c"],
                          C.PRICE: [10.0, 20.0, 5.0, 7.0], C.REPLENISHABLE: [True, False, False, None],
                          C.ITEM_NAME: ["one", "two", "three", "four"]})
    members = pd.DataFrame({
        C.MEMBER_ID: ["A", "B", "C", "X"],
        C.JOINED_AT: [datetime(2023, 1, 1, tzinfo=UTC), DT - timedelta(days=15.5),
                      datetime(2024, 1, 1, tzinfo=UTC), DT],
        C.CHANNEL: ["store", "web", "app", "web"]})
    tx = pd.DataFrame([
        _line("A", "O1", 10, "I1", 10.0),
        _line("A", "O1", 10, "I2", 40.0, discount=10.0),
        _line("A", "O2", 40, "I1", 20.0, discount=5.0, category="a"),
        _line("A", "O3", 120, "I2", 20.0),
        _line("A", "O3", 120, "I3", 10.0),
        _line("A", "R1", 5, "I2", -20.0, is_return=True),
        _line("A", "O4", 0, "I1", 100.0),  # at exactly D: not in snapshot D
        _line("B", "O5", 2.5, "I1", 10.0),
        _line("X", "O6", -1, "I3", 5.0),  # after D
    ])
    return tx, members, items


@pytest.fixture
def lake(settings):
    write_lake(settings, *three_members())
    return settings


NAN = float("nan")
EXPECTED = {  # hand-computed, see three_members
    "A": {F.TENURE_DAYS: 547, F.RECENCY_DAYS: 10.0, F.FIRST_PURCHASE_DAYS: 120.0, F.ORDERS_TOTAL: 3,
          F.SPEND_TOTAL: 80.0, F.orders(30): 1, F.orders(90): 2, F.orders(180): 3, F.orders(365): 3,
          F.spend(30): 30.0, F.spend(90): 50.0, F.spend(180): 80.0, F.spend(365): 80.0,
          F.AVG_ORDER_VALUE: 100 / 3, F.GAP_MEAN_DAYS: 55.0, F.GAP_STD_DAYS: math.sqrt(1250),
          F.RECENCY_GAP_RATIO: 10 / 55, F.SPEND_PREV_90D: 30.0, F.SPEND_TREND_90D: 50 / 30 - 1,
          F.BASKET_SIZE_MEAN: 5 / 3, F.N_CATEGORIES: 2, F.TOP_CATEGORY: "b", F.TOP_CATEGORY_SHARE: 0.7,
          F.CATEGORY_ENTROPY: -(0.3 * math.log(0.3) + 0.7 * math.log(0.7)), F.DISCOUNT_SHARE: 15 / 115,
          F.RETURN_SHARE: 0.2, F.REPLENISHABLE_SHARE: 0.3,
          # ranked: A and B only (n=2): rank 1 -> 1 + floor(0 * 5 / 2) = 1, rank 2 -> 1 + floor(5 / 2) = 3
          F.RFM_R: 1, F.RFM_F: 3, F.RFM_M: 3, F.RFM_SEGMENT: "At risk", F.LIFECYCLE_STAGE: "active",
          F.CHANNEL: "store"},
    "B": {F.TENURE_DAYS: 15, F.RECENCY_DAYS: 2.5, F.FIRST_PURCHASE_DAYS: 2.5, F.ORDERS_TOTAL: 1,
          F.SPEND_TOTAL: 10.0, F.orders(30): 1, F.orders(90): 1, F.orders(180): 1, F.orders(365): 1,
          F.spend(30): 10.0, F.spend(90): 10.0, F.spend(180): 10.0, F.spend(365): 10.0,
          F.AVG_ORDER_VALUE: 10.0, F.GAP_MEAN_DAYS: NAN, F.GAP_STD_DAYS: NAN, F.RECENCY_GAP_RATIO: NAN,
          F.SPEND_PREV_90D: 0.0, F.SPEND_TREND_90D: NAN, F.BASKET_SIZE_MEAN: 1.0, F.N_CATEGORIES: 1,
          F.TOP_CATEGORY: "a", F.TOP_CATEGORY_SHARE: 1.0, F.CATEGORY_ENTROPY: 0.0, F.DISCOUNT_SHARE: 0.0,
          F.RETURN_SHARE: 0.0, F.REPLENISHABLE_SHARE: 1.0, F.RFM_R: 3, F.RFM_F: 1, F.RFM_M: 1,
          F.RFM_SEGMENT: "New", F.LIFECYCLE_STAGE: "new", F.CHANNEL: "web"},
    "C": {F.TENURE_DAYS: 182, F.RECENCY_DAYS: NAN, F.FIRST_PURCHASE_DAYS: NAN, F.ORDERS_TOTAL: 0,
          F.SPEND_TOTAL: 0.0, F.orders(30): 0, F.orders(90): 0, F.orders(180): 0, F.orders(365): 0,
          F.spend(30): 0.0, F.spend(90): 0.0, F.spend(180): 0.0, F.spend(365): 0.0,
          F.AVG_ORDER_VALUE: NAN, F.GAP_MEAN_DAYS: NAN, F.GAP_STD_DAYS: NAN, F.RECENCY_GAP_RATIO: NAN,
          F.SPEND_PREV_90D: 0.0, F.SPEND_TREND_90D: NAN, F.BASKET_SIZE_MEAN: NAN, F.N_CATEGORIES: 0,
          F.TOP_CATEGORY: None, F.TOP_CATEGORY_SHARE: NAN, F.CATEGORY_ENTROPY: NAN, F.DISCOUNT_SHARE: NAN,
          F.RETURN_SHARE: NAN, F.REPLENISHABLE_SHARE: NAN, F.RFM_R: 0, F.RFM_F: 0, F.RFM_M: 0,
          F.RFM_SEGMENT: "Prospect", F.LIFECYCLE_STAGE: "churned", F.CHANNEL: "app"},
}


def _assert_same(a, b, exact: bool = True) -> None:
    """Identical tables (schema and values, NaN equal to NaN). ``exact=False``: floats to 1e-12, for
    lakes whose rows are laid out differently (a float sum depends on the order of its terms)."""
    assert a.schema.equals(b.schema, check_metadata=False)
    pd.testing.assert_frame_equal(a.to_pandas(), b.to_pandas(), check_exact=exact, rtol=1e-12, atol=1e-12)


def _assert_value(actual, expected, where: str) -> None:
    if isinstance(expected, float):
        if math.isnan(expected):
            assert isinstance(actual, float) and math.isnan(actual), where
        else:
            assert actual == pytest.approx(expected, rel=1e-12, abs=1e-12), where
    else:
        assert actual == expected, where


def test_three_member_example_exact_values(lake):
    frame = member_features_frame(lake, D)
    assert frame[C.MEMBER_ID].tolist() == ["A", "B", "C"]  # X joined at D: not in snapshot D
    assert (frame[C.AS_OF] == pd.Timestamp("2024-07-01", tz="UTC")).all()
    for member, expected in EXPECTED.items():
        row = frame.set_index(C.MEMBER_ID).loc[member]
        assert set(expected) == set(frame.columns) - {C.MEMBER_ID, C.AS_OF}
        for col, value in expected.items():
            _assert_value(row[col], value, f"{member}.{col}")


def test_member_category_and_item_values(lake):
    views = compute_views(lake, D)
    mc = views[MEMBER_CATEGORY_VIEW].to_pandas().set_index([C.MEMBER_ID, C.CATEGORY])
    assert list(mc.index) == [("A", "a"), ("A", "b"), ("B", "a")]
    expected = {
        ("A", "a"): [2, 0.3, 10.0, 30.0, NAN, 10 / 30, True],
        ("A", "b"): [2, 0.7, 10.0, 110.0, NAN, 10 / 110, False],
        ("B", "a"): [1, 1.0, 2.5, NAN, NAN, NAN, True],
    }
    cols = [FC.CAT_ORDERS, FC.CAT_SPEND_SHARE, FC.CAT_RECENCY_DAYS, FC.CAT_GAP_MEAN_DAYS, FC.CAT_GAP_STD_DAYS,
            FC.CAT_DUE_RATIO, FC.CAT_REPLENISHABLE]
    for key, values in expected.items():
        for col, value in zip(cols, values, strict=True):
            _assert_value(mc.loc[key, col], value, f"{key}.{col}")
    items = views[ITEM_VIEW].to_pandas().set_index(C.ITEM_ID)
    expected_items = {
        "I1": [2, 3, 0.5, 10.0, "a", True], "I2": [1, 1, 1.0, 20.0, "b", False],
        "I3": [0, 0, 0.0, 5.0, "b", False], "I4": [0, 0, NAN, 7.0, "c", False],
    }
    icols = [FI.ITEM_BUYERS_30D, FI.ITEM_ORDERS_90D, FI.ITEM_REPEAT_RATE, FI.ITEM_PRICE, FI.ITEM_CATEGORY,
             FI.ITEM_REPLENISHABLE]
    assert list(items.index) == ["I1", "I2", "I3", "I4"]
    for item, values in expected_items.items():
        for col, value in zip(icols, values, strict=True):
            _assert_value(items.loc[item, col], value, f"{item}.{col}")


def test_compute_features_writes_contract_schema_atomically_and_reproducibly(lake):
    dates = [D, "2024-06-01"]
    written = compute_features(lake, dates)
    assert set(written) == set(FEATURE_VIEWS)
    for view in FEATURE_VIEWS:
        assert written[view] == [snapshot_path(lake, view, "2024-06-01"),
                                 snapshot_path(lake, view, "2024-07-01")]
        table = pq.read_table(written[view][1])
        assert table.schema.equals(arrow_schema(lake, view), check_metadata=False)
        assert not list(written[view][1].parent.glob(".*"))  # no temporaries left
    first = pq.read_table(written[MEMBER_VIEW][1])
    seen = []
    compute_features(lake, [D], views=(MEMBER_VIEW,), progress=lambda n, total, d: seen.append((n, total, d)))
    assert seen == [(1, 1, D)]
    _assert_same(pq.read_table(written[MEMBER_VIEW][1]), first)
    june = pq.read_table(written[MEMBER_VIEW][0]).to_pandas()
    assert june[C.MEMBER_ID].tolist() == ["A", "C"]  # B joined on 2024-06-15


def test_point_in_time_later_transactions_change_nothing(settings, tmp_path):
    tx, members, items = three_members()
    write_lake(settings, tx, members, items)
    before = compute_views(settings, D)
    later = pd.DataFrame([
        _line("A", "L1", 0, "I2", 500.0), _line("B", "L2", 0, "I3", 7.0, is_return=True),
        _line("C", "L3", -0.001, "I1", 9.0), _line("C", "L4", -40, "I4", 3.0, category="new"),
    ])
    joiner = pd.DataFrame({C.MEMBER_ID: ["Y"], C.JOINED_AT: [DT + timedelta(days=3)], C.CHANNEL: ["app"]})
    write_lake(settings, pd.concat([tx, later], ignore_index=True), pd.concat([members, joiner]), items)
    after = compute_views(settings, D)
    for view in FEATURE_VIEWS:
        _assert_same(after[view], before[view])


def _small_random(seed: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    tx, members, items = random_lake_frames(150, seed=seed, days=400, lines_per_member=12, n_items=60,
                                            n_categories=6)
    rng = np.random.default_rng(seed)
    # same-time orders of one member, and lines of one order with a missing category
    dup = tx[~tx[C.IS_RETURN]].sample(20, random_state=seed).copy()
    dup[C.ORDER_ID] = dup[C.ORDER_ID] + "-twin"
    tx = pd.concat([tx, dup], ignore_index=True)
    tx.loc[rng.random(len(tx)) < 0.1, C.CATEGORY] = None
    return tx, members, items


@pytest.mark.parametrize("seed", [1, 2])
def test_point_in_time_equals_lake_filtered_before_d(settings, tmp_path, seed):
    tx, members, items = _small_random(seed)
    write_lake(settings, tx, members, items)
    rng = np.random.default_rng(seed)
    cut_settings = make_settings(tmp_path / "cut")
    for offset in rng.integers(30, 400, 3):
        d = date(2023, 1, 1) + timedelta(days=int(offset))
        ts_d = pd.Timestamp(d.isoformat(), tz="UTC")
        full = compute_views(settings, d)
        write_lake(cut_settings, tx[tx[C.TS] < ts_d], members[members[C.JOINED_AT] < ts_d], items)
        cut = compute_views(cut_settings, d)
        for view in FEATURE_VIEWS:
            assert full[view].num_rows > 0
            _assert_same(cut[view], full[view], exact=False)


def _assert_frames_close(actual: pd.DataFrame, expected: pd.DataFrame, where: str) -> None:
    assert list(actual.columns) == list(expected.columns), where
    assert len(actual) == len(expected), where
    for col in actual.columns:
        a, e = actual[col].reset_index(drop=True), expected[col].reset_index(drop=True)
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a.to_numpy(float), e.to_numpy(float), rtol=1e-9, atol=1e-9,
                                       err_msg=f"{where}.{col}")
        else:
            assert a.astype(object).where(a.notna(), None).tolist() == \
                e.astype(object).where(e.notna(), None).tolist(), f"{where}.{col}"


@pytest.mark.parametrize("seed", [3, 4])
def test_pandas_reference_equals_duckdb(settings, seed):
    tx, members, items = _small_random(seed)
    write_lake(settings, tx, members, items)
    for d in (date(2023, 4, 1), date(2023, 9, 15), date(2024, 3, 1)):
        ours = compute_views(settings, d)
        ref = reference_views(tx, members, items, d, settings)
        for view in FEATURE_VIEWS:
            assert len(ref[view]) > 0
            _assert_frames_close(ours[view].to_pandas(), ref[view], f"{view}@{d}")
        stages = set(ref[MEMBER_VIEW][F.LIFECYCLE_STAGE])
        assert len(stages) >= 3, stages  # the data exercises several rules


def test_default_snapshot_dates(settings):
    s = make_settings(settings.dirs.home, features={"snapshot_every_days": 7, "history_days": 20})
    assert default_snapshot_dates(s, "2024-07-01") == [date(2024, 6, 17), date(2024, 6, 24), date(2024, 7, 1)]
    assert len(default_snapshot_dates(settings, D)) == 730 // 7 + 1


def test_sql_transpiles_to_spark(settings):
    steps = feature_sql(settings, D, dialect="spark")
    assert [s.name for s in steps] == ["_lines", "_base", "_cats", "_mco", "_mc", *FEATURE_VIEWS]
    text = "\n".join(s.sql for s in steps)
    assert "UNIX_MICROS(" in text and "EPOCH_US" not in text


def test_missing_lake_and_bad_input_errors(settings):
    with pytest.raises(FileNotFoundError, match="transactions"):
        member_features_frame(settings, D)
    tx, members, items = three_members()
    write_lake(settings, tx, members.drop(columns=[C.CHANNEL]), items)
    member_features_frame(settings, D)  # optional column absent: fine (null channel)
    write_lake(settings, tx.drop(columns=[C.AMOUNT]), members, items)
    with pytest.raises(ValueError, match="amount"):
        member_features_frame(settings, D)
    with pytest.raises(ValueError, match="ISO date"):
        compute_features(settings, ["01/07/2024"])
    with pytest.raises(ValueError, match="unknown feature view"):
        compute_features(settings, [D], views=("nope",))


def test_member_features_frame_on_a_connection_equals_the_lake(lake):
    tx, members, items = three_members()
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        for name, frame in (("transactions", tx), ("members", members), ("items", items)):
            con.register(name, frame)
        direct = member_features_frame(con, D, settings=lake)
    pd.testing.assert_frame_equal(direct, member_features_frame(lake, D), check_exact=True)
    with pytest.raises(TypeError, match="settings"):
        member_features_frame(duckdb.connect(), D)


def test_line_view_is_not_stored_and_results_do_not_depend_on_threads(settings):
    steps = {s.name: s for s in feature_steps(settings, D)}
    assert not steps["_lines"].materialize and steps["_mco"].materialize
    write_lake(settings, *_small_random(5))
    d = date(2024, 1, 15)
    with lake_connection(settings, threads=1) as con:
        one = compute_views(con, d, settings=settings)
    with lake_connection(settings, threads=4) as con:
        four = compute_views(con, d, settings=settings)
    for view in FEATURE_VIEWS:
        assert one[view].num_rows > 0
        _assert_same(four[view], one[view], exact=False)

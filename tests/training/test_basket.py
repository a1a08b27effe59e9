"""Basket rules: a known answer by hand, mlxtend's apriori + association_rules on the Online Retail file
(same rules, values equal to 1e-9), the planted demo pairs at the top, and goes_with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.contract import C
from training.basket import Baskets, R, SimilarItems, association_rules, goes_with

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "online_retail"


def _lines(baskets: dict[str, list[str]]) -> pd.DataFrame:
    rows = [(o, i) for o, items in baskets.items() for i in items]
    return pd.DataFrame(rows, columns=[C.ORDER_ID, C.ITEM_ID]).assign(**{C.IS_RETURN: False})


def test_rules_by_hand() -> None:
    # 5 baskets: a in 4, b in 3, a & b in 3, c in 2 (once with a), d once; a line twice counts once
    lines = _lines({"o1": ["a", "b", "b"], "o2": ["a", "b"], "o3": ["a", "b", "c"], "o4": ["a"],
                    "o5": ["c", "d"]})
    lines = pd.concat([lines, pd.DataFrame({C.ORDER_ID: ["o4"], C.ITEM_ID: ["z"], C.IS_RETURN: [True]})])
    rules = association_rules(Baskets.from_lines(lines), min_count=1).set_index([R.ANTECEDENT, R.CONSEQUENT])
    ab, ba = rules.loc[("a", "b")], rules.loc[("b", "a")]
    assert (ab[R.COUNT], ab[R.ANTECEDENT_COUNT], ab[R.CONSEQUENT_COUNT]) == (3, 4, 3)
    assert ab[R.SUPPORT] == pytest.approx(3 / 5)
    assert ab[R.CONFIDENCE] == pytest.approx(3 / 4) and ba[R.CONFIDENCE] == pytest.approx(1.0)
    assert ab[R.LIFT] == pytest.approx((3 / 4) / (3 / 5))
    assert ab[R.LEVERAGE] == pytest.approx(3 / 5 - 4 / 5 * 3 / 5)
    assert ab[R.CONVICTION] == pytest.approx((1 - 3 / 5) / (1 - 3 / 4))
    assert np.isinf(ba[R.CONVICTION])  # confidence 1
    assert "z" not in set(rules.index.get_level_values(0))  # the return line is not a purchase
    # min_count: a & c and c & d occur once, b & c once
    strict = association_rules(Baskets.from_lines(lines), min_count=2)
    assert set(zip(strict[R.ANTECEDENT], strict[R.CONSEQUENT], strict=True)) == {("a", "b"), ("b", "a")}
    # sorted by lift: c -> d (lift 2.5) first
    assert tuple(rules.index[0]) in {("c", "d"), ("d", "c")}


def test_goes_with_takes_the_strongest_rule_and_skips_the_basket() -> None:
    lines = _lines({f"o{k}": items for k, items in enumerate(
        [["cake", "candles"]] * 6 + [["cake", "balloons"]] * 2 + [["candles", "balloons"]] * 3 + [["milk"]] * 4)})
    rules = association_rules(Baskets.from_lines(lines), min_count=1)
    got = goes_with(rules, ["cake"], top=5)
    assert got[R.ITEM].tolist() == ["candles", "balloons"]
    assert got[R.CONFIDENCE].tolist() == pytest.approx([6 / 8, 2 / 8])
    both = goes_with(rules, ["cake", "candles"], top=5)
    assert both[R.ITEM].tolist() == ["balloons"]
    assert both[R.BECAUSE].tolist() == ["candles"]  # 3/9 beats cake's 2/8
    assert goes_with(rules, ["unknown"]).empty


def test_category_baskets_need_a_category_for_every_item() -> None:
    lines = _lines({"o1": ["a", "b"]})
    with pytest.raises(ValueError, match=r"\['b'\] have no category"):
        Baskets.from_lines(lines, by="category", items=pd.DataFrame({C.ITEM_ID: ["a"], C.CATEGORY: ["x"]}))


@pytest.fixture(scope="module")
def retail_lines(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    if not DATA.is_dir():
        pytest.skip(f"real data folder {DATA} is absent")
    from features.ingest import ingest, sources_from_dir
    from tests.conftest import make_settings
    from training.dataset import read_lake_table

    s = make_settings(tmp_path_factory.mktemp("retail") / "home")
    ingest(sources_from_dir(DATA, "online-retail"), "online-retail", s)
    return read_lake_table(s, "transactions")


@pytest.mark.realdata
@pytest.mark.parametrize("min_support", [0.01, 0.006])
def test_rules_equal_mlxtend_on_online_retail(retail_lines: pd.DataFrame, min_support: float) -> None:
    from mlxtend.frequent_patterns import apriori
    from mlxtend.frequent_patterns import association_rules as mlx_rules

    december = retail_lines[retail_lines[C.TS] < pd.Timestamp("2011-01-01", tz="UTC")]
    baskets = Baskets.from_lines(december)
    assert baskets.n == 1394  # December 2010 invoices with a customer (cancellations are returns)
    ours = association_rules(baskets, min_count=1, min_support=min_support)
    onehot = pd.DataFrame(baskets.matrix.toarray().astype(bool), columns=baskets.labels.astype(str))
    frequent = apriori(onehot, min_support=min_support, use_colnames=True, max_len=2)
    ref = mlx_rules(frequent, num_itemsets=baskets.n, metric="confidence", min_threshold=0.0)
    ref = pd.DataFrame({R.ANTECEDENT: [next(iter(a)) for a in ref["antecedents"]],
                        R.CONSEQUENT: [next(iter(c)) for c in ref["consequents"]],
                        R.SUPPORT: ref["support"], R.CONFIDENCE: ref["confidence"], R.LIFT: ref["lift"],
                        R.LEVERAGE: ref["leverage"], R.CONVICTION: ref["conviction"]})
    assert len(ours) > 100 and len(ours) == len(ref)
    merged = ours.merge(ref, on=[R.ANTECEDENT, R.CONSEQUENT], suffixes=("", "_ref"), validate="1:1")
    assert len(merged) == len(ref)  # the same rules
    for col in (R.SUPPORT, R.CONFIDENCE, R.LIFT, R.LEVERAGE):
        np.testing.assert_allclose(merged[col], merged[f"{col}_ref"], rtol=0, atol=1e-9)
    finite = np.isfinite(merged[f"{R.CONVICTION}_ref"])
    np.testing.assert_allclose(merged.loc[finite, R.CONVICTION], merged.loc[finite, f"{R.CONVICTION}_ref"],
                               rtol=1e-9)
    assert np.isinf(merged.loc[~finite, R.CONVICTION]).all()


def test_similar_items_put_co_bought_items_together() -> None:
    rng = np.random.default_rng(3)
    groups = [["a1", "a2", "a3"], ["b1", "b2", "b3"], ["c1", "c2", "c3"]]
    baskets = {f"o{k}": list(rng.choice(groups[k % 3], size=2, replace=False)) for k in range(600)}
    model = SimilarItems(factors=8, iterations=15).fit(Baskets.from_lines(_lines(baskets)))
    for group in groups:
        near = model.similar(group[0], n=2)[R.ITEM].tolist()
        assert sorted(near) == sorted(group[1:])
    with pytest.raises(KeyError, match="'zz'"):
        model.similar("zz")

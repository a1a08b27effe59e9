"""The mapping model: built-in mappings load, bad mappings are refused with the key named, and the
expression language accepts only its fixed set of operations."""

from __future__ import annotations

from pathlib import Path

import pytest

from features.contract import C
from features.mapping import MappingError, builtin_mappings, load_mapping, parse_expression

MINIMAL = """
name: shop
tables:
  transactions:
    files: ["tx.csv"]
    columns:
      member_id: cust
      order_id: order
      ts: when
      item_id: sku
      quantity: qty
      amount: {expr: "qty * price"}
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "m.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_builtin_mappings_load_and_read_the_expected_columns() -> None:
    assert builtin_mappings() == ("cdnow", "demo", "online-retail")
    retail = load_mapping("online-retail")
    tx = retail.tables["transactions"]
    assert tx.columns[C.AMOUNT].expr == "Quantity * UnitPrice"
    assert set(tx.source_columns()) == {"CustomerID", "InvoiceNo", "InvoiceDate", "StockCode", "Description",
                                        "Quantity", "UnitPrice"}
    assert tx.timezone == "Europe/London"
    assert "POST" in tx.non_products.values
    cdnow = load_mapping("cdnow")
    assert cdnow.derive_members and cdnow.derive_items is not None
    assert cdnow.tables["transactions"].on_key_conflict == "sum"
    assert not cdnow.tables["transactions"].drop_exact_duplicates
    demo = load_mapping("demo")
    assert set(demo.tables) == {"transactions", "members", "items", "campaigns"}
    assert demo.tables["members"].columns[C.JOINED_AT].source == C.JOINED_AT


def test_shorthand_string_is_a_source_column(tmp_path: Path) -> None:
    m = load_mapping(_write(tmp_path, MINIMAL))
    spec = m.tables["transactions"].columns[C.MEMBER_ID]
    assert spec.source == "cust" and spec.expr is None
    assert m.tables["transactions"].required_source_columns() == ("cust", "order", "when", "sku", "qty",
                                                                   "price")


def test_unknown_key_is_rejected_with_its_path(tmp_path: Path) -> None:
    p = _write(tmp_path, MINIMAL.replace("    files:", "    colour: red\n    files:"))
    with pytest.raises(MappingError, match=r"tables\.transactions\.colour: Extra inputs are not permitted"):
        load_mapping(p)


def test_unmapped_required_column_is_rejected(tmp_path: Path) -> None:
    p = _write(tmp_path, MINIMAL.replace("      quantity: qty\n", ""))
    with pytest.raises(MappingError, match=r"required contract column.*quantity.*not mapped"):
        load_mapping(p)


def test_column_outside_the_contract_is_rejected(tmp_path: Path) -> None:
    p = _write(tmp_path, MINIMAL + "      colour: paint\n")
    with pytest.raises(MappingError, match="colour not in the contract's transactions table"):
        load_mapping(p)


def test_unknown_time_zone_is_rejected(tmp_path: Path) -> None:
    p = _write(tmp_path, MINIMAL.replace("    files:", "    timezone: Mars/Olympus\n    files:"))
    with pytest.raises(MappingError, match="unknown time zone 'Mars/Olympus'"):
        load_mapping(p)


def test_derived_items_need_a_category(tmp_path: Path) -> None:
    p = _write(tmp_path, MINIMAL + "derive_items: {}\n")
    with pytest.raises(MappingError, match=r"derive_items needs tables\.transactions\.columns\.category"):
        load_mapping(p)


def test_unknown_builtin_and_missing_file_are_named(tmp_path: Path) -> None:
    msg = "no built-in mapping 'acme'; built-in: cdnow, demo, online-retail"
    with pytest.raises(MappingError, match=msg):
        load_mapping("acme")
    with pytest.raises(MappingError, match="does not exist"):
        load_mapping(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, columns", [
    ("Quantity * UnitPrice", ("Quantity", "UnitPrice")),
    ("concat(customer_id, '-', date)", ("customer_id", "date")),
    ("startswith(InvoiceNo, 'C')", ("InvoiceNo",)),
    ("col('Unit Price') * -1", ("Unit Price",)),
    ("if_else(qty < 0, 'R', 'S')", ("qty",)),
    ("'cd'", ()),
])
def test_expressions_report_the_columns_they_read(text: str, columns: tuple[str, ...]) -> None:
    assert parse_expression(text)[1] == columns


@pytest.mark.parametrize("text, message", [
    ("__import__('os').system('true')", "unknown function"),
    ("qty.real", "is not an allowed operation"),
    ("[1, 2]", "is not an allowed operation"),
    ("lambda: 1", "is not an allowed operation"),
    ("qty ** 2", "is not an allowed operation"),
    ("0 < qty < 5", "only single comparisons"),
    ("startswith(x)", r"startswith\(\) takes 2 arguments, got 1"),
    ("col(name)", "col\\(\\) takes a quoted column name"),
    ("qty *", "is not valid"),
])
def test_expressions_outside_the_language_are_refused(text: str, message: str) -> None:
    with pytest.raises(MappingError, match=message):
        parse_expression(text)


def test_bad_expression_in_a_file_names_the_column(tmp_path: Path) -> None:
    p = _write(tmp_path, MINIMAL.replace('"qty * price"', '"open(price)"'))
    with pytest.raises(MappingError, match=r"tables\.transactions\.columns\.amount.*unknown function 'open'"):
        load_mapping(p)

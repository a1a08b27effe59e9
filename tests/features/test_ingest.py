"""Ingest through a mapping: normalised values, quarantined rows with their reasons and line numbers,
file-level errors, append mode, atomicity and reconciling counts. Small CSV and parquet files in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features import lake
from features.contract import TRANSACTIONS, C
from features.ingest import IngestError, ingest, sources_from_dir
from features.mapping import load_mapping
from features.settings import Settings
from tests.conftest import make_settings

MAPPING = """
name: shop
tables:
  transactions:
    files: ["tx*.csv"]
    timezone: Europe/Paris
    columns:
      member_id: cust
      order_id: order
      ts: {source: when, format: "%Y-%m-%d %H:%M:%S"}
      item_id: sku
      quantity: qty
      amount: {expr: "qty * price"}
      is_return: {expr: "startswith(order, 'R')"}
    ignore: [note]
    non_products: {column: sku, values: [POST]}
  members:
    files: ["members.csv"]
    columns: {member_id: id, joined_at: {source: joined, format: "%Y-%m-%d"}}
  items:
    files: ["items.csv"]
    columns: {item_id: sku, category: cat, price: price}
  campaigns:
    files: ["campaigns.csv"]
    columns: {campaign_id: campaign, member_id: id, arm: arm, sent_at: sent}
"""

TX = """cust,order,when,sku,qty,price,note
007,o1,2023-07-01 12:00:00,A,2,1.50,first
007,o1,2023-07-01 12:00:00,B,1,4.00,
,o2,2023-07-02 09:00:00,A,1,1.50,
008,o3,2023-13-45 10:00:00,A,1,1.50,
008,o4,2023-07-03 10:00:00,A,0,1.50,
008,o5,2023-07-03 10:00:00,A,1,-1.50,
008,R6,2023-07-04 10:00:00,A,1,1.50,
008,o7,2100-01-01 10:00:00,A,1,1.50,
007,o1,2023-07-01 12:00:00,A,2,1.50,first
008,o8,2023-07-05 10:00:00,POST,1,3.00,
009,o9,2023-07-05 10:00:00,A,1,1.50,
008,o10,2023-07-05 10:00:00,A,abc,1.50,
008,o11,2023-01-15 23:30:00,B,3,4.00,
008,o12,2999-01-01 10:00:00,A,1,1.50,
"""
MEMBERS = "id,joined\n007,2023-01-01\n008,2023-02-01\n,2023-03-01\n"
ITEMS = "sku,cat,price\nA,food,1.5\nB,toys,4\nC,toys,-2\n"
CAMPAIGNS = ("campaign,id,arm,sent\nc1,007,treatment,2023-07-10T09:00:00+02:00\n"
             "c1,008,Holdout,2023-07-10 07:00:00\n"
             "c1,009,treatment,2023-07-10 07:00:00\nc2,008,control,2023-07-11 07:00:00\n")


def _raw(tmp_path: Path, **override: str) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir(exist_ok=True)
    files = {"tx.csv": TX, "members.csv": MEMBERS, "items.csv": ITEMS, "campaigns.csv": CAMPAIGNS, **override}
    for name, text in files.items():
        (raw / name).write_text(text, encoding="utf-8")
    (tmp_path / "shop.yaml").write_text(MAPPING, encoding="utf-8")
    return raw


def _settings(tmp_path: Path, share: float = 0.9) -> Settings:
    return make_settings(tmp_path / "home", ingest={"max_reject_share": share})


def _lake(settings: Settings, table: str) -> pd.DataFrame:
    import duckdb

    glob = lake.table_glob(settings, table)
    return duckdb.sql(f"SELECT * FROM read_parquet('{glob}', hive_partitioning = false)").df()


def _utc(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


def _rejects(path: str | None) -> pd.DataFrame:
    assert path is not None
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.fixture
def shop(tmp_path: Path) -> tuple[Path, Path, Settings]:
    return _raw(tmp_path), tmp_path / "shop.yaml", _settings(tmp_path)


def test_bad_rows_are_quarantined_with_reason_and_line(shop: tuple[Path, Path, Settings]) -> None:
    raw, mapping, settings = shop
    report = ingest(sources_from_dir(raw, mapping), mapping, settings, run_id="r1")
    tx = report.tables["transactions"]
    assert (tx.read, tx.accepted, tx.rejected) == (14, 4, 10)
    assert report.reconciles
    rej = _rejects(tx.rejects_path)
    assert Path(tx.rejects_path).name == "transactions-r1.csv"
    assert list(rej.columns) == ["cust", "order", "when", "sku", "qty", "price", "note", C.SOURCE_FILE,
                                 C.SOURCE_ROW, C.REASON]
    reasons = dict(zip(rej[C.SOURCE_ROW].astype(int), rej[C.REASON], strict=True))
    assert reasons[4] == "missing member_id (column cust)"
    assert reasons[5] == "unparseable date '2023-13-45 10:00:00' in column when"
    assert reasons[6] == "quantity zero"
    assert reasons[7] == "negative amount -1.5 on a non-return line"
    assert reasons[9].startswith("ts 2100-01-01 09:00:00+00:00 is after the run date ")
    assert reasons[10] == "duplicate of source row 2"
    assert reasons[11] == "not a product line"
    assert reasons[12] == "unknown member_id '009' (not in members)"
    assert reasons[13] == "unparseable number 'abc' in column qty"
    assert reasons[15] == "date '2999-01-01 10:00:00' in column when is outside the years 1678-2261"
    assert len(reasons) == 10
    # the original source values travel with the reason
    row = rej[rej[C.SOURCE_ROW] == "10"].iloc[0]
    assert (row["cust"], row["order"], row["note"]) == ("007", "o1", "first")
    assert row[C.SOURCE_FILE] == str(raw / "tx.csv")
    assert tx.rejected_by_reason == {
        "duplicate row": 1, "missing member_id": 1, "negative amount on a non-return line": 1,
        "not a product line": 1, "quantity zero": 1, "ts after the run date": 1, "unknown member_id": 1,
        "unparseable date in column when": 1, "unparseable number in column qty": 1,
        "date out of range in column when": 1}


def test_valid_rows_are_all_present_with_normalised_values(shop: tuple[Path, Path, Settings]) -> None:
    raw, mapping, settings = shop
    ingest(sources_from_dir(raw, mapping), mapping, settings)
    df = _lake(settings, "transactions").sort_values([C.ORDER_ID, C.ITEM_ID]).reset_index(drop=True)
    assert list(df.columns) == list(TRANSACTIONS.names)
    assert df[C.ORDER_ID].tolist() == ["R6", "o1", "o1", "o11"]
    assert df[C.MEMBER_ID].tolist() == ["008", "007", "007", "008"]  # identifiers stay text, zeros kept
    # Europe/Paris is UTC+2 in July and UTC+1 in January
    assert df[C.TS].tolist() == [_utc("2023-07-04 08:00"), _utc("2023-07-01 10:00"), _utc("2023-07-01 10:00"),
                                 _utc("2023-01-15 22:30")]
    assert df[C.AMOUNT].tolist() == [-1.5, 3.0, 4.0, 12.0]
    assert df[C.QUANTITY].tolist() == [-1.0, 2.0, 1.0, 3.0]
    assert df[C.IS_RETURN].tolist() == [True, False, False, False]
    assert df[C.DISCOUNT].tolist() == [0.0] * 4
    assert df[C.CATEGORY].tolist() == ["food", "food", "toys", "toys"]  # filled from the items table
    files = sorted(p.relative_to(lake.table_dir(settings, "transactions")).as_posix()
                   for p in lake.table_dir(settings, "transactions").rglob("*.parquet"))
    assert files == ["month=2023-01/part-0.parquet", "month=2023-07/part-0.parquet"]
    schema = pq.read_schema(lake.table_dir(settings, "transactions") / "month=2023-07" / "part-0.parquet")
    assert schema.field(C.TS).type == pa.timestamp("us", tz="UTC")
    assert schema.field(C.MEMBER_ID).type == pa.string()


def test_other_tables_validated_and_normalised(shop: tuple[Path, Path, Settings]) -> None:
    raw, mapping, settings = shop
    report = ingest(sources_from_dir(raw, mapping), mapping, settings)
    assert {n: (t.read, t.accepted, t.rejected) for n, t in report.tables.items()} == {
        "members": (3, 2, 1), "items": (3, 2, 1), "transactions": (14, 4, 10), "campaigns": (4, 2, 2)}
    assert _rejects(report.tables["items"].rejects_path)[C.REASON].tolist() == ["negative price -2.0"]
    assert _rejects(report.tables["members"].rejects_path)[C.REASON].tolist() == [
        "missing member_id (column id)"]
    camp = _rejects(report.tables["campaigns"].rejects_path)
    assert camp[C.REASON].tolist() == ["unknown member_id '009' (not in members)",
                                       "arm 'control' is not treatment or holdout"]
    assert camp[C.SOURCE_ROW].tolist() == ["4", "5"]
    c = _lake(settings, "campaigns").sort_values(C.MEMBER_ID)
    assert c[C.ARM].tolist() == ["treatment", "holdout"]  # 'Holdout' normalised
    # an explicit offset is kept (+02:00), a naive time is in the default zone (UTC)
    assert c[C.SENT_AT].tolist() == [pd.Timestamp("2023-07-10 07:00", tz="UTC")] * 2
    m = _lake(settings, "members").sort_values(C.MEMBER_ID)
    assert m[C.JOINED_AT].tolist() == [_utc("2023-01-01"), _utc("2023-02-01")]
    out = report.to_dict()
    json.dumps(out)
    assert out["reconciles"] is True
    assert out["tables"]["transactions"]["rejects_path"] == report.tables["transactions"].rejects_path
    assert set(report.paths) == {"members", "items", "transactions", "campaigns", "members_rejects",
                                 "items_rejects", "transactions_rejects", "campaigns_rejects"}


def test_empty_file_is_a_file_error(tmp_path: Path) -> None:
    raw = _raw(tmp_path, **{"tx.csv": ""})
    with pytest.raises(IngestError, match=r"transactions file .*tx\.csv is empty \(0 bytes\)"):
        ingest({"transactions": [raw / "tx.csv"]}, tmp_path / "shop.yaml", _settings(tmp_path))


def test_header_only_file_refuses_replace_but_appends_nothing(tmp_path: Path) -> None:
    raw = _raw(tmp_path, **{"tx2.csv": TX.splitlines()[0] + "\n"})
    settings = _settings(tmp_path)
    mapping = tmp_path / "shop.yaml"
    with pytest.raises(IngestError, match=r"hold no data rows; replacing the lake table with nothing"):
        ingest({"transactions": [raw / "tx2.csv"]}, mapping, settings)
    ingest({"transactions": [raw / "tx.csv"]}, mapping, settings)  # no members anywhere: 009 is accepted
    report = ingest({"transactions": [raw / "tx2.csv"]}, mapping, settings, mode="append")
    t = report.tables["transactions"]
    assert (t.read, t.accepted, t.rejected, t.written) == (0, 0, 0, 5)
    assert len(_lake(settings, "transactions")) == 5


def test_missing_source_column_lists_what_the_file_has(tmp_path: Path) -> None:
    raw = _raw(tmp_path, **{"tx.csv": TX.replace("cust,order,when", "customer,order,when")})
    with pytest.raises(IngestError, match=r"tx\.csv lacks column\(s\) cust that the mapping reads; it has "
                                          r"customer, order, when, sku, qty, price, note"):
        ingest({"transactions": [raw / "tx.csv"]}, tmp_path / "shop.yaml", _settings(tmp_path))


def test_unknown_source_column_is_named(tmp_path: Path) -> None:
    text = "\n".join(line + ",x" for line in TX.splitlines()).replace("note,x", "note,store") + "\n"
    raw = _raw(tmp_path, **{"tx.csv": text})
    with pytest.raises(IngestError, match=r"has column\(s\) store that the mapping neither reads nor"):
        ingest({"transactions": [raw / "tx.csv"]}, tmp_path / "shop.yaml", _settings(tmp_path))


def test_latin1_file_with_declared_encoding_vs_wrong_encoding(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    items = "sku,cat,price\nA,café,1.5\nB,crème,4\n"
    (raw / "items.csv").write_bytes(items.encode("latin-1"))
    settings = _settings(tmp_path)
    utf8 = tmp_path / "shop.yaml"
    with pytest.raises(IngestError, match=r"items\.csv is not valid utf-8: byte 0xe9 at offset 19 \(line 2\) "
                                          r"does not decode"):
        ingest({"items": [raw / "items.csv"]}, utf8, settings)
    assert not lake.table_dir(settings, "items").exists()
    latin = tmp_path / "latin.yaml"
    latin.write_text(MAPPING.replace('files: ["items.csv"]',
                                     'files: ["items.csv"]\n    csv: {encoding: latin-1}'), encoding="utf-8")
    ingest({"items": [raw / "items.csv"]}, latin, settings)
    assert sorted(_lake(settings, "items")[C.CATEGORY]) == ["café", "crème"]


def test_encoding_auto_detects_latin1(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    words = ["café crème", "crème brûlée", "thé à la menthe", "pâtisserie fraîche", "bière blonde", "gâteau"]
    rows = [f"S{i},{words[i % len(words)]} numéro {i} été,{i}.5" for i in range(60)]
    (raw / "items.csv").write_bytes(("sku,cat,price\n" + "\n".join(rows) + "\n").encode("latin-1"))
    auto = tmp_path / "auto.yaml"
    auto.write_text(MAPPING.replace('files: ["items.csv"]',
                                    'files: ["items.csv"]\n    csv: {encoding: auto}'), encoding="utf-8")
    settings = _settings(tmp_path)
    ingest({"items": [raw / "items.csv"]}, auto, settings)
    cats = _lake(settings, "items").sort_values(C.PRICE)[C.CATEGORY].tolist()
    assert cats[:2] == ["café crème numéro 0 été", "crème brûlée numéro 1 été"]


def test_too_many_bad_rows_write_nothing_to_the_lake(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    settings = _settings(tmp_path, share=0.5)  # 9 bad of 14 (the non-product line does not count)
    with pytest.raises(IngestError, match=r"transactions: 9 of 14 rows are bad \(64.3%, more than "
                                          r"settings.ingest.max_reject_share = 50%\).*nothing was written"):
        ingest(sources_from_dir(raw, tmp_path / "shop.yaml"), tmp_path / "shop.yaml", settings, run_id="r9")
    assert not settings.dirs.lake.exists() or not any(settings.dirs.lake.rglob("*.parquet"))
    assert (settings.dirs.rejects / "transactions-r9.csv").is_file()  # the reasons can be read


def test_failed_run_leaves_the_previous_lake_untouched(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    settings = _settings(tmp_path)
    mapping = tmp_path / "shop.yaml"
    ingest(sources_from_dir(raw, mapping), mapping, settings)
    before = {p: p.read_bytes() for p in settings.dirs.lake.rglob("*.parquet")}
    # transactions and members stage fine; the campaigns file fails after them
    (raw / "tx.csv").write_text(TX.replace("o11", "o13"), encoding="utf-8")
    (raw / "campaigns.csv").write_text(CAMPAIGNS.replace("campaign,id", "campaign,who"), encoding="utf-8")
    with pytest.raises(IngestError, match="campaigns file"):
        ingest(sources_from_dir(raw, mapping), mapping, settings)
    after = {p: p.read_bytes() for p in settings.dirs.lake.rglob("*.parquet")}
    assert after == before
    assert [p.name for p in settings.dirs.lake.iterdir() if p.name.startswith(".")] == []
    assert not list(settings.dirs.home.glob(".ingest-*"))


def test_append_merges_and_dedupes_on_the_key(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    settings = _settings(tmp_path)
    mapping = tmp_path / "shop.yaml"
    ingest(sources_from_dir(raw, mapping), mapping, settings)
    new = ("cust,order,when,sku,qty,price,note\n"
           "007,o1,2023-07-01 12:00:00,A,5,1.50,corrected\n"   # same key as a lake row: replaces it
           "008,o20,2023-08-01 10:00:00,B,1,4.00,\n")
    (raw / "tx2.csv").write_text(new, encoding="utf-8")
    report = ingest({"transactions": [raw / "tx2.csv"]}, mapping, settings, mode="append")
    t = report.tables["transactions"]
    assert (t.read, t.accepted, t.rejected, t.written, t.replaced) == (2, 2, 0, 5, 1)
    df = _lake(settings, "transactions")
    assert len(df) == 5
    o1a = df[(df[C.ORDER_ID] == "o1") & (df[C.ITEM_ID] == "A")]
    assert o1a[C.QUANTITY].tolist() == [5.0] and o1a[C.AMOUNT].tolist() == [7.5]
    # appending the same file again changes nothing
    ingest({"transactions": [raw / "tx2.csv"]}, mapping, settings, mode="append")
    again = _lake(settings, "transactions")
    pd.testing.assert_frame_equal(again.sort_values([C.ORDER_ID, C.ITEM_ID]).reset_index(drop=True),
                                  df.sort_values([C.ORDER_ID, C.ITEM_ID]).reset_index(drop=True))


def _key_mapping(tmp_path: Path, policy: str) -> Path:
    p = tmp_path / f"{policy}.yaml"
    p.write_text(MAPPING.replace("    ignore: [note]", f"    ignore: [note]\n    on_key_conflict: {policy}"),
                 encoding="utf-8")
    return p


KEYS = ("cust,order,when,sku,qty,price,note\n"
        "007,o1,2023-07-01 12:00:00,A,1,1.50,\n"
        "007,o1,2023-07-01 12:05:00,A,2,1.50,\n"
        "008,o1,2023-07-01 12:00:00,A,3,1.50,\n")


@pytest.mark.parametrize("policy, kept, reasons", [
    ("reject", [(1.0, 1.5)],
     ["same key (order_id, item_id, is_return) as source row 2 with different values"] * 2),
    ("last", [(3.0, 4.5)],
     ["superseded by source row 4 with the same key (order_id, item_id, is_return)"] * 2),
    ("sum", [(3.0, 4.5)], ["same order line as source row 2 but another member_id"]),
])
def test_rows_sharing_a_key(tmp_path: Path, policy: str, kept: list, reasons: list[str]) -> None:
    raw = _raw(tmp_path, **{"tx.csv": KEYS})
    settings = _settings(tmp_path)
    report = ingest({"transactions": [raw / "tx.csv"]}, _key_mapping(tmp_path, policy), settings)
    t = report.tables["transactions"]
    assert t.read == 3 and t.rejected == len(reasons) and t.reconciles
    assert _rejects(t.rejects_path)[C.REASON].tolist() == reasons
    df = _lake(settings, "transactions")
    assert list(zip(df[C.QUANTITY], df[C.AMOUNT], strict=True)) == kept
    if policy == "sum":  # summed lines keep the earliest time
        assert df[C.TS].tolist() == [pd.Timestamp("2023-07-01 10:00", tz="UTC")]


def test_demo_layout_is_found_and_ingested_with_the_identity_mapping(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    (raw / "transactions").mkdir(parents=True)
    ts = pa.array([1_700_000_000_000_000, 1_700_000_100_000_000], type=pa.timestamp("us", tz="UTC"))
    tx = pa.table({C.MEMBER_ID: ["m1", "m1"], C.ORDER_ID: ["o1", "o1"], C.TS: ts, C.ITEM_ID: ["i1", "i2"],
                   C.CATEGORY: [None, "cat2"], C.QUANTITY: [1.0, 2.0], C.AMOUNT: [3.0, 4.0],
                   C.DISCOUNT: [0.5, 0.0], C.IS_RETURN: [False, False]})
    pq.write_table(tx.slice(0, 1), raw / "transactions" / "part-00000.parquet")
    pq.write_table(tx.slice(1, 1), raw / "transactions" / "part-00001.parquet")
    pq.write_table(pa.table({C.MEMBER_ID: ["m1"], C.JOINED_AT: ts.slice(0, 1)}), raw / "members.parquet")
    pq.write_table(pa.table({C.ITEM_ID: ["i1", "i2"], C.CATEGORY: ["cat1", "cat2"]}), raw / "items.parquet")
    (raw / "truth").mkdir()
    pq.write_table(pa.table({"x": [1]}), raw / "truth" / "members.parquet")
    sources = sources_from_dir(raw, "demo")
    assert sources == {"transactions": [raw / "transactions" / "part-00000.parquet",
                                        raw / "transactions" / "part-00001.parquet"],
                       "members": [raw / "members.parquet"], "items": [raw / "items.parquet"]}
    settings = make_settings(tmp_path / "home")
    report = ingest(sources, "demo", settings)
    assert report.tables["transactions"].rejects_path is None
    assert {n: t.written for n, t in report.tables.items()} == {"members": 1, "items": 2, "transactions": 2}
    df = _lake(settings, "transactions").sort_values(C.ITEM_ID)
    assert df[C.CATEGORY].tolist() == ["cat1", "cat2"]
    assert df[C.DISCOUNT].tolist() == [0.5, 0.0]
    assert df[C.TS].iloc[0] == pd.Timestamp(1_700_000_000, unit="s", tz="UTC")
    assert load_mapping("demo").name == "demo"


def test_derived_tables_from_transactions_only(tmp_path: Path) -> None:
    mapping = tmp_path / "derive.yaml"
    mapping.write_text("""
name: derive
tables:
  transactions:
    files: ["*.csv"]
    format: whitespace
    columns:
      member_id: cust
      order_id: {expr: "concat(cust, '-', day)"}
      ts: {source: day, format: "%Y%m%d"}
      item_id: {expr: "'cd'"}
      category: {expr: "'music'"}
      quantity: n
      amount: usd
    drop_exact_duplicates: false
    on_key_conflict: sum
derive_members: true
derive_items: {name: "'CD'"}
""", encoding="utf-8")
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "cd.csv").write_bytes(b" cust day n usd\r\n 01 19970101 1 10.00\r\n 01 19970101 1 10.00\r\n"
                                 b" 01 19970105 2 22.50\r\n 02 19970103 1 0.00\r\n")
    settings = make_settings(tmp_path / "home")
    report = ingest(sources_from_dir(raw, mapping), mapping, settings)
    t = report.tables["transactions"]
    assert (t.read, t.accepted, t.rejected, t.written) == (4, 4, 0, 3)
    assert report.tables["members"].derived and report.tables["members"].written == 2
    tx = _lake(settings, "transactions").sort_values(C.ORDER_ID)
    assert tx[C.ORDER_ID].tolist() == ["01-19970101", "01-19970105", "02-19970103"]
    assert tx[C.AMOUNT].tolist() == [20.0, 22.5, 0.0]  # identical lines are two purchases, summed
    m = _lake(settings, "members").sort_values(C.MEMBER_ID)
    assert m[C.JOINED_AT].tolist() == [_utc("1997-01-01"), _utc("1997-01-03")]
    items = _lake(settings, "items")
    assert items[[C.ITEM_ID, C.CATEGORY, C.ITEM_NAME]].values.tolist() == [["cd", "music", "CD"]]
    assert items[C.PRICE].tolist() == [10.0]  # median unit price of purchase lines: 20/2, 22.5/2, 0/1


def test_sources_for_a_derived_table_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "members.csv"
    f.write_text("a\n1\n", encoding="utf-8")
    with pytest.raises(IngestError, match="derives the members table from the transactions"):
        ingest({"members": [f]}, "cdnow", make_settings(tmp_path / "home"))

"""The two public data sets in ../shared/data ingest through their built-in mappings with reconciling
counts; the figures are those of /work/shared/data/README.md. Skipped when the folder is absent."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd
import pytest

from features import lake
from features.contract import C
from features.ingest import ingest, sources_from_dir
from features.settings import Settings
from tests.conftest import make_settings

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def _data(sub: str) -> Path:
    path = DATA / sub
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent")
    return path


def _lake(settings: Settings, table: str) -> pd.DataFrame:
    glob = lake.table_glob(settings, table)
    return duckdb.sql(f"SELECT * FROM read_parquet('{glob}', hive_partitioning = false)").df()


def test_cdnow_ingests_with_reconciling_counts(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "home")
    sources = sources_from_dir(_data("cdnow"), "cdnow")
    assert [p.name for p in sources["transactions"]] == ["CDNOW_master.txt"]
    report = ingest(sources, "cdnow", settings)
    tx = report.tables["transactions"]
    assert tx.read == 69_659  # 69,660 lines with the header
    assert (tx.accepted, tx.rejected) == (69_659, 0)  # every purchase kept; identical lines are purchases
    assert report.reconciles
    df = _lake(settings, "transactions")
    assert df[C.MEMBER_ID].nunique() == 23_570
    assert report.tables["members"].written == 23_570
    assert len(df) == tx.written < tx.accepted  # several lines of one customer-day summed into one order
    assert df[C.TS].min() == pd.Timestamp("1997-01-01", tz="UTC")
    assert df[C.TS].max() == pd.Timestamp("1998-06-30", tz="UTC")
    members = _lake(settings, "members")
    assert members[C.JOINED_AT].max() < pd.Timestamp("1997-04-01", tz="UTC")  # the 1997-Q1 cohort
    raw = pd.read_csv(sources["transactions"][0], sep=r"\s+", dtype={"customer_id": str})
    assert df[C.AMOUNT].sum() == pytest.approx(raw["dollar_value"].sum())
    assert df[C.QUANTITY].sum() == raw["number_of_cds"].sum()
    one = df[df[C.ORDER_ID] == "00002-19970112"]  # two lines in the file: 1 CD for 12.00, 5 for 77.00
    assert (one[C.QUANTITY].tolist(), one[C.AMOUNT].tolist()) == ([6.0], [89.0])


def test_online_retail_ingests_with_reconciling_counts(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "home")
    sources = sources_from_dir(_data("online_retail"), "online-retail")
    report = ingest(sources, "online-retail", settings)
    tx = report.tables["transactions"]
    assert tx.read == 70_051
    assert tx.read == tx.accepted + tx.rejected and report.reconciles
    raw = pd.read_csv(sources["transactions"][0], dtype=str, keep_default_na=False)
    no_customer = raw["CustomerID"] == ""
    # lines without CustomerID are quarantined with that reason (some are also non-product lines)
    rejects = pd.read_csv(tx.rejects_path, dtype=str, keep_default_na=False)
    by_row = dict(zip(rejects[C.SOURCE_ROW].astype(int), rejects[C.REASON], strict=True))
    lines = (raw.index[no_customer] + 2).tolist()
    assert all(line in by_row for line in lines)
    assert tx.rejected_by_reason["missing member_id"] == sum(
        by_row[line] == "missing member_id (from int_id(CustomerID))" for line in lines)
    assert tx.rejected_by_reason["missing member_id"] > 27_000
    assert tx.rejected_by_reason["not a product line"] > 300
    assert tx.rejected_by_reason["duplicate row"] > 600
    df = _lake(settings, "transactions")
    assert set(df[C.ITEM_ID]).isdisjoint({"POST", "M", "D", "DOT", "BANK CHARGES", "C2", "AMAZONFEE"})
    assert df[C.TS].min() == pd.Timestamp("2010-12-01 08:26", tz="UTC")  # London is on UTC in winter
    assert df[C.TS].max() <= pd.Timestamp("2011-01-25 10:38", tz="UTC")
    # cancellations (invoice "C...") are return lines with negative quantity and amount
    returns = df[df[C.ORDER_ID].str.startswith("C")]
    assert len(returns) > 500
    assert returns[C.IS_RETURN].all() and (returns[C.QUANTITY] < 0).all() and (returns[C.AMOUNT] < 0).all()
    assert not df.loc[~df[C.ORDER_ID].str.startswith("C"), C.IS_RETURN].any()
    # member ids are the integer customer ids as text
    assert df[C.MEMBER_ID].str.fullmatch(r"\d{5}").all()
    customers = raw.loc[~no_customer & ~raw["StockCode"].isin(["POST", "M", "D", "DOT", "C2"]), "CustomerID"]
    assert df[C.MEMBER_ID].nunique() == report.tables["members"].written
    assert abs(df[C.MEMBER_ID].nunique() - customers.nunique()) <= 5
    assert df[C.CATEGORY].notna().all()

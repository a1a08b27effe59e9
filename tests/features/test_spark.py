"""The feature definitions on Spark (local mode) give what DuckDB gives, from the same lake, to 1e-9."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.lake import FEATURE_VIEWS, MEMBER_VIEW, snapshot_dates, snapshot_path
from tests.conftest import make_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _java() -> bool:
    return shutil.which("java") is not None


def assert_tables_close(a: pa.Table, b: pa.Table, what: str) -> None:
    """Same columns, types, rows and order; floats to 1e-9 relative (NaN where NaN), the rest exactly."""
    assert a.schema == b.schema, what
    assert a.num_rows == b.num_rows, what
    for name in a.column_names:
        x, y = a.column(name), b.column(name)
        if pa.types.is_floating(x.type):
            xv, yv = x.to_numpy(), y.to_numpy()
            np.testing.assert_allclose(yv, xv, rtol=1e-9, atol=1e-12, equal_nan=True, err_msg=f"{what}.{name}")
        else:
            assert x.to_pylist() == y.to_pylist(), f"{what}.{name}"


@pytest.mark.skipif(not _java(), reason="Spark needs java on PATH (Java 17)")
def test_spark_computes_the_same_snapshots_as_duckdb(demo_workspace, tmp_path: Path) -> None:
    from features import compute, spark

    settings, _ = demo_workspace
    dates = snapshot_dates(settings, MEMBER_VIEW)
    picked = [dates[0], dates[len(dates) // 2], dates[-1]]  # an early one, with few members and orders
    session = spark.spark_session(settings)
    for d in picked:
        ours = compute.compute_views(settings, d)
        theirs = spark.compute_views(settings, d, spark=session)
        assert set(theirs) == set(FEATURE_VIEWS)
        for view in FEATURE_VIEWS:
            assert ours[view].num_rows > 0, (view, d)
            assert_tables_close(ours[view], theirs[view], f"{view}@{d}")

    # engine: spark in settings sends compute_features (every caller: build, backtests, the daily run) to Spark
    home = tmp_path / "home"
    shutil.copytree(settings.dirs.lake, home / "lake")
    on_spark = make_settings(home, features={"engine": "spark"})
    written = compute.compute_features(on_spark, [picked[-1]])
    for view in FEATURE_VIEWS:
        assert written[view] == [snapshot_path(on_spark, view, picked[-1].isoformat())]
        assert_tables_close(pq.read_table(snapshot_path(settings, view, picked[-1].isoformat())),
                            pq.read_table(written[view][0]), f"written {view}")
        # the executors' parts were streamed into the one file and removed: nothing else is left beside it
        assert [p.name for p in written[view][0].parent.iterdir()] == [written[view][0].name]


def test_a_lake_without_transactions_is_named(tmp_path: Path) -> None:
    from features import spark

    settings = make_settings(tmp_path / "home")
    with pytest.raises(FileNotFoundError, match="lake table 'transactions' has no parquet files"):
        spark.register_lake(None, settings)

"""The dashboard page: written whole, opens in headless Chromium with no network, and its charts hold the
numbers the lake and the campaign report give. Skipped (with the install line) without Chromium."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from features.contract import C, F
from features.lake import MEMBER_VIEW, snapshot_dates, snapshot_path
from pipelines.dashboard import build_dashboard

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def dashboard(demo_workspace, tmp_path_factory):
    settings, _ = demo_workspace
    out = tmp_path_factory.mktemp("dash") / "dashboard"
    return settings, build_dashboard(settings, out), out


def test_the_numbers_match_the_lake(dashboard) -> None:
    from training.campaigns import campaign_effects
    from training.dataset import read_lake_table

    settings, rep, out = dashboard
    data = json.loads((out / "data.json").read_text())
    members = read_lake_table(settings, "members")
    assert data["growth"]["members"] == len(members) == sum(sum(v) for v in data["growth"]["new_by_channel"].values())
    latest = snapshot_dates(settings, MEMBER_VIEW)[-1]
    snap = pd.read_parquet(snapshot_path(settings, MEMBER_VIEW, latest.isoformat()))
    counts = snap[F.RFM_SEGMENT].value_counts()
    assert dict(zip(data["lifecycle"]["segments"], data["lifecycle"]["segment_counts"], strict=True)) == \
        {s: int(counts[s]) for s in data["lifecycle"]["segments"]}
    t = data["lifecycle"]["transition"]
    assert t["to"] == latest.isoformat()
    assert all(row is None or abs(sum(v for v in row if v is not None) - 1) < 1e-3 or all(v is None for v in row)
               for row in t["shares"])
    lines = read_lake_table(settings, "transactions")
    report = campaign_effects(read_lake_table(settings, "campaigns"), lines)
    got = {(r["campaign_id"], r["window_days"]): r["lift"] for r in data["campaigns"]["rows"]}
    assert got == {(r.campaign_id, r.window_days): round(r.lift, 5) for r in report.itertuples()}
    assert rep["charts"] == ["new-members", "activation", "rfm", "stages", "flow", "campaigns"]
    assert not list(out.parent.glob(".dashboard.tmp-*"))


@pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                    reason="Debian's chromium and chromium-driver are not installed (apt-get install chromium "
                           "chromium-driver)")
def test_the_page_renders_its_charts_in_headless_chromium(dashboard, tmp_path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    settings, _, out = dashboard
    data = json.loads((out / "data.json").read_text())
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1300,3200", "--proxy-server=http://127.0.0.1:9"):  # no network: all inline
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        driver.get((out / "index.html").as_uri())
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(
            "return document.querySelectorAll('.js-plotly-plot .main-svg').length >= 6"))
        charts = driver.execute_script("""
            return Array.from(document.querySelectorAll('.js-plotly-plot')).map(el => ({
                id: el.id, traces: el.data.map(t => ({name: t.name || null, x: Array.from(t.x || []),
                                                      y: Array.from(t.y || [])}))}));""")
        shot = tmp_path / "dashboard.png"
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    by_id = {c["id"]: c["traces"] for c in charts}
    assert set(by_id) == {f"chart-{k}" for k in ("new-members", "activation", "rfm", "stages", "flow", "campaigns")}
    new = by_id["chart-new-members"]
    assert sum(sum(t["y"]) for t in new) == data["growth"]["members"]
    assert {t["name"] for t in new} == set(data["growth"]["new_by_channel"])
    assert by_id["chart-rfm"][0]["y"] == data["lifecycle"]["segment_counts"]
    lifts = {(t["name"], x): y for t in by_id["chart-campaigns"] for x, y in zip(t["x"], t["y"], strict=True)}
    for r in data["campaigns"]["rows"]:
        assert lifts[(f"{r['window_days']} days", r["campaign_id"])] == pytest.approx(r["lift"])
    assert shot.stat().st_size > 50_000  # a rendered page, not a blank one
    members = set(pd.read_parquet(snapshot_path(settings, MEMBER_VIEW, data["lifecycle"]["as_of"]),
                                  columns=[C.MEMBER_ID])[C.MEMBER_ID].astype(str))
    page = (out / "index.html").read_text()
    assert not any(m in page for m in list(members)[:200])  # aggregates only: no member id on the page

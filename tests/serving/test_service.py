"""The API against a real `bentoml serve` subprocess on a small demo workspace with champion models."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from features.contract import C, F
from features.lake import MEMBER_VIEW, snapshot_dates, snapshot_path
from serving.guard import _digest, key_matches, unprocessable
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]
KEY = "test-key-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(trained_workspace, tmp_path_factory: pytest.TempPathFactory):
    settings, trained_env = trained_workspace
    tmp = tmp_path_factory.mktemp("serve")
    env = {**trained_env, "REPURCHASE__SERVING__RELOAD_INTERVAL_S": "1", "REPURCHASE_API_KEYS": f"other-key,{KEY}"}
    cli = [sys.executable, "-m", "pipelines.cli"]
    port = _free_port()
    log = open(tmp / "serve.log", "wb")  # noqa: SIM115 - the server writes to it until the module ends
    proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "serving.service:Repurchase", "--port",
                             str(port), "--host", "127.0.0.1"], env=env, cwd=REPO, stdout=log, stderr=log,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{base}/readyz", timeout=2).status == 200:
                break
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.5)
        assert proc.poll() is None, (tmp / "serve.log").read_text()
    else:
        pytest.fail("the service did not become ready: " + (tmp / "serve.log").read_text()[-3000:])
    yield {"base": base, "env": env, "settings": settings, "cli": cli, "log": tmp / "serve.log"}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def call(base: str, path: str, body: object, key: str | None = KEY, raw: bytes | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(base + path, data=raw if raw is not None else json.dumps(body).encode(),
                                 headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _snapshot(settings) -> pd.DataFrame:
    latest = snapshot_dates(settings, MEMBER_VIEW)[-1]
    return pd.read_parquet(snapshot_path(settings, MEMBER_VIEW, latest.isoformat()))


def test_profile_of_a_known_member_carries_every_answer(served) -> None:
    snap = _snapshot(served["settings"])
    row = snap[snap[F.LIFECYCLE_STAGE] == "active"].iloc[0]
    code, p = call(served["base"], "/v1/profile", {"member_id": row[C.MEMBER_ID], "n": 5})
    assert code == 200, p
    assert p["known"] and not p["cold_start"] and p["member_id"] == row[C.MEMBER_ID]
    assert p["rfm_segment"] == row[F.RFM_SEGMENT] and p["lifecycle_stage"] == "active"
    assert p["as_of"] == str(snapshot_dates(served["settings"])[-1])
    assert 0 < p["churn"]["probability"] < 1 and p["churn"]["band"] in ("low", "medium", "high")
    # reasons explain risk: the bands of serving.reasons_bands get one to three, the low band none
    assert (1 <= len(p["churn"]["reasons"]) <= 3) if p["churn"]["band"] != "low" else p["churn"]["reasons"] == []
    dormant = snap[snap[F.LIFECYCLE_STAGE] == "dormant"].iloc[0]
    code, d = call(served["base"], "/v1/profile", {"member_id": dormant[C.MEMBER_ID], "n": 5})
    assert code == 200 and d["churn"]["band"] != "low" and 1 <= len(d["churn"]["reasons"]) <= 3, d["churn"]
    np_ = p["next_purchase"]
    assert 0 <= np_["p_7d"] <= np_["p_30d"] <= 1
    assert np_["interval_from"] <= np_["expected_date"] <= np_["interval_to"] or np_["beyond_horizon"]
    assert p["value"]["expected_spend"] >= 0 and p["value"]["horizon_days"] == 365
    assert [r["rank"] for r in p["recommendations"]] == [1, 2, 3, 4, 5]
    assert set(p["models"]) == {"churn", "next_purchase", "value", "recommend"}
    # the feature age is counted to now; the demo's data ends in the past, so it is stale
    age = (pd.Timestamp.now(tz="UTC") - pd.Timestamp(p["as_of"], tz="UTC")).total_seconds() / 86400
    assert abs(p["feature_age_days"] - age) < 0.1 and p["stale"] is True


def test_unknown_member_gets_the_flagged_cold_start_answer(served) -> None:
    code, p = call(served["base"], "/v1/profile", {"member_id": "NOT-A-MEMBER", "n": 3})
    assert code == 200
    assert p["cold_start"] and not p["known"] and p["churn"] is None and p["value"] is None
    assert p["note"] and len(p["recommendations"]) == 3
    assert {r["source"] for r in p["recommendations"]} == {"popular"}


def test_batch_profiles_keep_the_order_and_match_single_calls(served) -> None:
    ids = [*_snapshot(served["settings"])[C.MEMBER_ID].iloc[:40], "NOBODY"]
    code, out = call(served["base"], "/v1/profiles", {"member_ids": ids, "n": 0})
    assert code == 200
    assert [p["member_id"] for p in out["profiles"]] == ids
    assert out["profiles"][-1]["cold_start"]
    _, one = call(served["base"], "/v1/profile", {"member_id": ids[3], "n": 0})
    assert one["churn"] == out["profiles"][3]["churn"] and one["value"] == out["profiles"][3]["value"]
    code, err = call(served["base"], "/v1/profiles", {"member_ids": ["x"] * 1001})
    assert code == 422 and err["fields"] == ["member_ids"]


def test_recommend_filters_and_batch(served) -> None:
    member = _snapshot(served["settings"])[C.MEMBER_ID].iloc[5]
    _, first = call(served["base"], "/v1/recommend", {"member_id": member, "n": 5})
    top = first["recommendations"][0]["item_id"]
    code, again = call(served["base"], "/v1/recommend", {"member_id": member, "n": 5, "exclude_items": [top]})
    assert code == 200 and top not in [r["item_id"] for r in again["recommendations"]]
    code, batch = call(served["base"], "/v1/recommend/batch", {"member_ids": [member, "NOBODY"], "n": 2})
    assert code == 200 and [m["member_id"] for m in batch["members"]] == [member, "NOBODY"]
    assert batch["members"][1]["cold_start"] and not batch["members"][0]["cold_start"]


def test_similar_basket_and_segment_pages(served) -> None:
    _, first = call(served["base"], "/v1/recommend", {"member_id": "NOBODY", "n": 1})
    item = first["recommendations"][0]["item_id"]
    code, sim = call(served["base"], "/v1/similar", {"item_id": item, "n": 4})
    assert code == 200 and sim["known"] and len(sim["similar"]) == 4
    assert item not in [s["item_id"] for s in sim["similar"]]
    code, sim = call(served["base"], "/v1/similar", {"item_id": "NO-SUCH-ITEM"})
    assert code == 200 and not sim["known"] and sim["similar"] == []
    code, b = call(served["base"], "/v1/basket", {"items": [item, "NO-SUCH-ITEM"], "n": 3})
    assert code == 200 and "NO-SUCH-ITEM" in b["unknown"] and item not in [g["item_id"] for g in b["goes_with"]]
    snap = _snapshot(served["settings"])
    want = sorted(snap.loc[snap[F.LIFECYCLE_STAGE] == "dormant", C.MEMBER_ID])
    got, page = [], 1
    while True:
        code, out = call(served["base"], "/v1/segment/members", {"stage": "dormant", "page": page, "page_size": 7})
        assert code == 200 and out["total"] == len(want)
        got += [m["member_id"] for m in out["members"]]
        if page >= out["pages"]:
            break
        page += 1
    assert got == want
    code, err = call(served["base"], "/v1/segment/members", {"segment": "No such"})
    assert code == 422 and err["fields"] == ["segment"]


def test_keys_are_checked_and_health_is_open(served) -> None:
    base = served["base"]
    assert call(base, "/v1/noop", {}, key=None)[0] == 401
    assert call(base, "/v1/noop", {}, key="wrong")[0] == 403
    assert call(base, "/v1/noop", {}, key="other-key") == (200, {"ok": True})
    for path in ("/healthz", "/readyz", "/metrics"):
        assert urllib.request.urlopen(base + path, timeout=5).status == 200
    req = urllib.request.Request(base + "/docs.json")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 401


@pytest.mark.parametrize(("body", "field"), [
    ({}, "member_id"),
    ({"member_id": ""}, "member_id"),
    ({"member_id": "M1", "n": -1}, "n"),
    ({"member_id": "M1", "n": "lots"}, "n"),
    ({"member_id": "M1", "n": "5"}, "n"),  # strict: no coercion from text
    ({"member_id": "M1", "n": False}, "n"),
    ({"member_id": "M1", "n": 2.5}, "n"),
    ({"member_id": "M1", "extra": 1}, "extra"),
    ({"member_id": "a\u0001b"}, "member_id"),
])
def test_bad_input_is_422_naming_the_field(served, body, field) -> None:
    code, err = call(served["base"], "/v1/profile", body)
    assert code == 422 and field in err["fields"] and field in err["error"]


def test_invalid_json_and_surrogates_are_422(served) -> None:
    assert call(served["base"], "/v1/profile", None, raw=b"{not json")[0] == 422
    code, err = call(served["base"], "/v1/profile", None, raw=b'{"member_id": "\\ud800"}')
    assert code == 422 and err["fields"] == ["body"]  # the JSON parser refuses a lone surrogate


def test_model_swap_under_load_drops_nothing(served) -> None:
    from mlflow.tracking import MlflowClient

    base, env = served["base"], served["env"]
    _, before = call(base, "/v1/status", {})
    subprocess.run([*served["cli"], "train", "churn"], env=env, cwd=REPO, check=True, capture_output=True,
                   timeout=600)
    uri = env["REPURCHASE__MLFLOW__TRACKING_URI"]
    mlc = MlflowClient(tracking_uri=uri, registry_uri=uri)
    new = mlc.get_model_version_by_alias("churn", "challenger").version
    assert str(new) != before["models"]["churn"]
    member = _snapshot(served["settings"])[C.MEMBER_ID].iloc[0]
    failures, versions, stop = [], set(), threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            code, p = call(base, "/v1/profile", {"member_id": member, "n": 2})
            if code != 200:
                failures.append((code, p))
            else:
                versions.add(p["models"]["churn"])

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    mlc.set_registered_model_alias("churn", "champion", str(new))  # what promote / rollback do
    deadline = time.time() + 60
    while time.time() < deadline and str(new) not in versions:
        time.sleep(0.2)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    assert failures == []
    assert versions == {before["models"]["churn"], str(new)}
    _, after = call(base, "/v1/status", {})
    assert after["models"]["churn"] == str(new) and after["reloads"] == before["reloads"] + 1
    assert after["models"]["recommend"] == before["models"]["recommend"]


def test_no_member_id_reaches_the_log(served) -> None:
    text = Path(served["log"]).read_text(errors="replace")
    member = _snapshot(served["settings"])[C.MEMBER_ID].iloc[0]
    assert "NOT-A-MEMBER" not in text and member not in text


def test_guard_helpers() -> None:
    assert key_matches(b"abc", [_digest("x"), _digest("abc")]) and not key_matches(b"abd", [_digest("abc")])
    body = unprocessable({"detail": [{"loc": ["member_ids", 3], "msg": "bad", "type": "t"}]})
    assert body["fields"] == ["member_ids.3"] and body["error"] == "invalid request: member_ids.3: bad"
    assert unprocessable([{"error": "nope"}])["error"] == "invalid request: nope"


FUZZ_EXAMPLES = 50  # per operation and generation mode (schema-valid, schema-invalid): ~1,000 calls in all


def _openapi_30_nullable(node: object) -> object:
    """The schema with pydantic's `anyOf: [X, {"type": "null"}]` written the OpenAPI 3.0 way (`X` with
    `nullable: true`): BentoML publishes 3.0.2, where `"type": "null"` is no type, so a fuzzer reads an
    optional field's null (`"categories": null`, documented as "any") as invalid input."""
    if isinstance(node, list):
        return [_openapi_30_nullable(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _openapi_30_nullable(v) for k, v in node.items()}
    options = out.get("anyOf")
    if isinstance(options, list) and len(options) == 2 and {"type": "null"} in options:
        other = next(o for o in options if o != {"type": "null"})
        out = {**{k: v for k, v in out.items() if k != "anyOf"}, **other, "nullable": True}
    return out


def test_fuzz_no_generated_input_gets_a_5xx(served) -> None:
    """Schema-driven fuzzing (schemathesis): bodies that fit the OpenAPI schema and bodies that break it, for
    every POST /v1 operation, never get a 5xx (nor no answer), and every answer has the declared content type
    and headers. Not checked, as they fail on the schema rather than the service: status codes (the schema
    BentoML publishes documents 400 where the guard answers 422), response bodies (it drops `nullable` from
    optional fields) and schema-valid bodies accepted (it cannot express the control-character rule of
    `serving.schemas`). Schema-invalid bodies must be refused, except a missing body where the body is empty
    anyway (`/v1/noop`, `/v1/status`)."""
    from collections import Counter

    import schemathesis
    from hypothesis import HealthCheck, Phase, given
    from hypothesis import settings as hypothesis_settings
    from schemathesis import GenerationMode
    from schemathesis.checks import content_type_conformance, response_headers_conformance
    from schemathesis.core.result import Ok

    base, auth = served["base"], {"Authorization": f"Bearer {KEY}"}
    with urllib.request.urlopen(urllib.request.Request(base + "/docs.json", headers=auth), timeout=10) as r:
        schema = schemathesis.openapi.from_dict(_openapi_30_nullable(json.loads(r.read())))
    schema.config.update(base_url=base)
    results = list(schema.get_all_operations())
    assert all(isinstance(res, Ok) for res in results), [res.err() for res in results if not isinstance(res, Ok)]
    operations = [res.ok() for res in results if res.ok().path.startswith("/v1/")]
    assert len(operations) >= 9 and {op.method for op in operations} == {"post"}, [op.label for op in operations]
    statuses: Counter[int] = Counter()
    accepted: Counter[str] = Counter()  # schema-invalid bodies answered below 400: reported, not failed
    accepted_example: dict[str, str] = {}
    server_errors: list[str] = []
    check_failures: list[str] = []

    def sent(body: bytes | str | None) -> str:
        text = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
        return text if len(text) <= 400 else text[:400] + "..."

    def fuzz(op, mode: GenerationMode) -> None:
        @hypothesis_settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                             phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def probe(case) -> None:
            try:
                response = case.call(headers=auth, timeout=30)
            except Exception as e:  # no answer at all (connection reset, timeout) is as bad as a 5xx
                server_errors.append(f"{op.label} [{mode.value}] -> no response ({type(e).__name__}: {e})\n"
                                     f"    request body: {sent(case.body)}")
                return
            statuses[response.status_code] += 1
            if response.status_code >= 500:
                server_errors.append(f"{op.label} [{mode.value}] -> {response.status_code}: "
                                     f"{sent(response.content)}\n    request body: {sent(response.request.body)}")
                return
            if mode is GenerationMode.NEGATIVE and response.status_code < 400:
                accepted[op.label] += 1
                accepted_example.setdefault(op.label, sent(response.request.body))
            try:
                case.validate_response(response, headers=auth,
                                       checks=[content_type_conformance, response_headers_conformance])
            except (AssertionError, BaseExceptionGroup) as e:
                check_failures.append(f"{op.label} [{mode.value}] -> {response.status_code}: "
                                      + " | ".join(ln.strip() for ln in str(e).splitlines()[:12] if ln.strip()) + "\n"
                                      f"    request body: {sent(response.request.body)}")

        probe()

    for op in operations:
        for mode in GenerationMode:
            fuzz(op, mode)

    log_tail = Path(served["log"]).read_text(errors="replace")[-3000:]
    assert not server_errors, (f"{len(server_errors)} of {statuses.total()} generated calls got a 5xx or no answer "
                               f"(statuses {dict(statuses)}):\n" + "\n".join(server_errors[:30])
                               + f"\n--- server log tail ---\n{log_tail}")
    assert not check_failures, f"{len(check_failures)} responses failed schemathesis checks:\n" + "\n".join(
        check_failures[:30])
    assert statuses[200] > 0 and statuses[422] > 0, dict(statuses)
    assert set(accepted) <= {"POST /v1/noop", "POST /v1/status"}, (accepted, accepted_example)
    print(f"fuzz: {statuses.total()} calls, {len(operations)} operations, statuses {dict(sorted(statuses.items()))}, "
          f"schema-invalid bodies accepted {dict(accepted)}, e.g. {accepted_example}")


def _check_scores_in_feast(settings, part: Path, picked: list[str], manifest: dict) -> None:
    """The scores reached Feast: online (view member_scores, service scores_v1) and offline (its source is
    the partition's online.parquet), equal to the partition's members.parquet."""
    from features.definitions import SCORES_SCHEMA, SCORES_SERVICE
    from features.store import feature_store, online_features, training_frame

    assert manifest["online"] == {"view": "member_scores", "rows": manifest["members"], "method": "bulk"}
    members = pd.read_parquet(part / "members.parquet").set_index(C.MEMBER_ID).loc[picked]
    recs = pd.read_parquet(part / "recommendations.parquet")
    online = online_features(settings, picked, SCORES_SERVICE).set_index(C.MEMBER_ID)
    entity = pd.DataFrame({C.MEMBER_ID: picked, C.EVENT_TIMESTAMP: pd.Timestamp(part.name[6:], tz="UTC")})
    offline = training_frame(settings, entity, SCORES_SERVICE).set_index(C.MEMBER_ID)
    versions = ",".join(f"{k}={v}" for k, v in sorted(manifest["versions"].items()))
    for frame in (online, offline):
        for m in picked:
            row, want = frame.loc[m], members.loc[m]
            assert row["churn_probability"] == pytest.approx(want["churn_probability"], rel=1e-12)
            assert row["expected_spend"] == pytest.approx(want["expected_spend"], rel=1e-12)
            assert row["np_p_30d"] == pytest.approx(want["np_p_30d"], rel=1e-12)
            assert row["churn_band"] == want["churn_band"] and row["lifecycle_stage"] == want["lifecycle_stage"]
            assert row["churn_reasons"] == "; ".join(want["churn_reasons"])
            explained = (want["churn_band"] in settings.serving.reasons_bands
                         and want["lifecycle_stage"] not in settings.serving.reasons_skip_stages)
            assert (row["churn_reasons"] == "") == (not explained)
            top = recs[recs[C.MEMBER_ID] == m].sort_values("rank").head(settings.recommend.n)["item_id"]
            assert row["recommended_items"] == ",".join(top) and row["scored_by"] == versions
    assert set(SCORES_SCHEMA) <= set(online.columns) and len(feature_store(settings).list_feature_views()) == 4


def _status(served) -> dict:
    code, s = call(served["base"], "/v1/status", {})
    assert code == 200, s
    return s


def test_score_writes_a_partition_the_api_then_answers_from(served) -> None:
    import hashlib

    from mlflow.tracking import MlflowClient

    settings = served["settings"]
    snap = _snapshot(settings)
    members = snap[C.MEMBER_ID].astype(str).tolist()
    picked = [members[0], members[len(members) // 2], members[-1]]
    live = {m: call(served["base"], "/v1/profile", {"member_id": m, "n": 5})[1] for m in picked}
    assert {p["source"] for p in live.values()} == {"live"} and _status(served)["scores_as_of"] is None

    def score() -> dict:
        done = subprocess.run([*served["cli"], "score", "--json"], env=served["env"], cwd=REPO, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def digest(path: Path) -> dict[str, str]:
        return {f: hashlib.sha256((path / f).read_bytes()).hexdigest()
                for f in ("members.parquet", "recommendations.parquet", "online.parquet")}

    first = score()
    part = Path(first["path"])
    latest = snapshot_dates(settings)[-1]
    assert part.name == f"as_of={latest}" and first["members"] == len(members)
    assert first["versions"] == _status(served)["models"] and first["recommend_n"] == 20
    assert first["recommendation_rows"] == 20 * len(members)
    run = MlflowClient(served["env"]["REPURCHASE__MLFLOW__TRACKING_URI"]).get_run(first["run_id"])
    assert run.data.tags["kind"] == "scoring" and run.data.metrics["members"] == len(members)
    assert run.data.params["version.churn"] == first["versions"]["churn"]
    files = digest(part)
    _check_scores_in_feast(settings, part, picked, first)
    second = score()  # the same date and models again: the same rows, the same bytes
    assert second["path"] == first["path"] and digest(part) == files

    deadline = time.time() + 30  # the watcher polls every second and picks the partition up
    while _status(served)["scores_as_of"] != str(latest):
        assert time.time() < deadline, "the service did not pick the scores partition up"
        time.sleep(0.5)
    for m, before in live.items():
        code, now = call(served["base"], "/v1/profile", {"member_id": m, "n": 5})
        assert code == 200 and now["source"] == "precomputed", now
        assert now["feature_age_days"] == pytest.approx(before["feature_age_days"], abs=0.01)
        drop = {"source", "feature_age_days", "recommendations"}
        assert {k: v for k, v in now.items() if k not in drop} == {k: v for k, v in before.items() if k not in drop}
        # ALS scores are float32 dot products: a batch of 20k and one member sum in another order
        for a, b in zip(now["recommendations"], before["recommendations"], strict=True):
            assert a["score"] == pytest.approx(b["score"], rel=1e-4, abs=1e-6)
            assert {k: v for k, v in a.items() if k != "score"} == {k: v for k, v in b.items() if k != "score"}
    code, batch = call(served["base"], "/v1/profiles", {"member_ids": [picked[0], "NOT-A-MEMBER", picked[1]],
                                                         "n": 5})
    assert code == 200
    assert [p["member_id"] for p in batch["profiles"]] == [picked[0], "NOT-A-MEMBER", picked[1]]
    assert [p["source"] for p in batch["profiles"]] == ["precomputed", "live", "precomputed"]
    assert batch["profiles"][1]["cold_start"]
    code, more = call(served["base"], "/v1/profile", {"member_id": picked[0], "n": 30})  # above the 20 kept
    assert code == 200 and more["source"] == "live" and more["churn"] == live[picked[0]]["churn"]

"""The guard service's HTTP API through FastAPI's test client, on the shipped testbed."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from diffmem.detect import NoiseMagnitude
from diffmem.server.app import ServerConfig, create_app
from diffmem.server.audit import AuditLog, prompt_hash


@pytest.fixture
def client(engine):
    with TestClient(create_app(engine, ServerConfig(model_name="testbed"))) as c:
        yield c


def _one_line_error(r, status):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"] and "\n" not in body["error"]
    return body["error"]


def test_detect_scores_equal_the_library_and_flag_the_memorized_prompt(client, engine, memorized,
                                                                       heldout):
    prompts = [memorized.prompt, heldout[0], heldout[1]]
    r = client.post("/v1/detect", json={"prompts": prompts})
    assert r.status_code == 200, r.text
    body = r.json()
    lib = NoiseMagnitude(steps=1).score(engine.adapter, prompts)
    got = np.array([x["score"] for x in body["results"]])
    np.testing.assert_allclose(got, lib, rtol=1e-4, atol=1e-5)
    assert body["threshold"] == pytest.approx(engine.threshold)
    assert [x["prompt"] for x in body["results"]] == prompts
    assert [x["flagged"] for x in body["results"]] == [bool(s > engine.threshold) for s in lib]
    assert body["results"][0]["flagged"] and not body["results"][1]["flagged"]
    assert all(x["threshold"] == body["threshold"] and not x["truncated"] for x in body["results"])


def test_concurrent_requests_share_micro_batches(engine, memorized, heldout):
    import httpx

    app = create_app(engine, ServerConfig(max_batch=16, max_wait_ms=50))
    prompts = [memorized.prompt, *heldout[:23]]
    requests = [prompts[i : i + 3] for i in range(0, 24, 3)]  # 8 requests of 3 prompts

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                return await asyncio.gather(*(c.post("/v1/detect", json={"prompts": p})
                                              for p in requests))

    responses = asyncio.run(main())
    assert all(r.status_code == 200 for r in responses)
    m = app.state.guard.metrics
    assert m.batch_size.sum() == 24  # every prompt scored exactly once
    assert m.batch_size.count() == 2  # 24 prompts, batches of at most 16: two UNet batches
    lib = NoiseMagnitude(steps=1).score(engine.adapter, prompts)
    got = [x["score"] for r in responses for x in r.json()["results"]]
    np.testing.assert_allclose(got, lib, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("kwargs", "status", "needle"), [
    ({"json": {"prompts": []}}, 422, "at least 1"),
    ({"json": {"prompts": ["a cat"] * 33}}, 422, "at most 32"),
    ({"json": {"prompts": ["word " * 90]}}, 422, "over the limit of"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "JSON"),
    ({"content": b"prompts=a+cat"}, 400, "JSON"),
    ({"json": {"prompts": "a cat"}}, 422, "prompts"),
    ({"json": {"prompts": [1, 2]}}, 422, "prompts.0"),
    ({"json": {"prompt": ["a cat"]}}, 422, "prompts"),
    ({"json": ["a cat"]}, 422, "body"),
    ({"content": b'{"prompts": ["' + b"a" * 70000 + b'"]}',
      "headers": {"content-type": "application/json"}}, 413, "limit"),
])
def test_bad_detect_input_is_a_4xx_with_one_line_and_the_server_keeps_serving(
        client, kwargs, status, needle):
    reason = _one_line_error(client.post("/v1/detect", **kwargs), status)
    assert needle in reason
    assert client.post("/v1/detect", json={"prompts": ["a cat"]}).status_code == 200


def test_unknown_mitigation_and_missing_index_are_422(client):
    reason = _one_line_error(client.post("/v1/generate", json={"prompt": "a cat",
                                                               "mitigate": "bogus"}), 422)
    assert "unknown mitigation 'bogus'" in reason


def test_long_prompts_are_truncated_and_reported_when_the_limit_allows(engine):
    with TestClient(create_app(engine, ServerConfig(max_tokens=200))) as c:
        r = c.post("/v1/detect", json={"prompts": ["word " * 90, "a cat"]})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert res[0]["truncated"] and res[0]["tokens"] == 90
    assert not res[1]["truncated"]


def test_api_key(engine, tmp_path):
    with TestClient(create_app(engine, ServerConfig(api_key="s3cret"))) as c:
        body = {"prompts": ["a cat"]}
        assert "missing API key" in _one_line_error(c.post("/v1/detect", json=body), 401)
        assert "wrong API key" in _one_line_error(
            c.post("/v1/detect", json=body, headers={"X-API-Key": "s3cre"}), 401)
        assert "wrong API key" in _one_line_error(
            c.post("/v1/detect", content=b"not json", headers={"X-API-Key": "x"}), 401)
        assert c.post("/v1/detect", json=body, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.post("/v1/detect", json=body,
                      headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/healthz").json()["auth"] is True
        assert c.get("/").status_code == 200


def test_audit_log_keeps_hashes_and_only_the_rejection_of_bad_requests(engine, tmp_path,
                                                                       memorized):
    audit = AuditLog(tmp_path / "audit.sqlite")
    with TestClient(create_app(engine, ServerConfig(api_key="k"), audit=audit)) as c:
        ok = c.post("/v1/detect", json={"prompts": [memorized.prompt, "a cat"]},
                    headers={"X-API-Key": "k"})
        assert ok.status_code == 200
        c.post("/v1/detect", json={"prompts": ["secret prompt"]})  # no key
        c.post("/v1/detect", json={"prompts": ["secret prompt", 3]}, headers={"X-API-Key": "k"})
    rows = audit.rows()
    audit.close()
    assert [r.decision for r in rows] == ["flagged", "clear", "rejected", "rejected"]
    assert rows[0].prompt_hash == prompt_hash(memorized.prompt)
    assert rows[0].score == pytest.approx(ok.json()["results"][0]["score"])
    assert rows[0].threshold == pytest.approx(engine.threshold)
    assert rows[0].client and rows[0].endpoint == "/v1/detect"
    for r in rows[2:]:
        assert r.prompt_hash is None and r.score is None
        assert "secret" not in (r.detail or "")
    assert rows[2].detail == "401 auth_missing" and rows[3].detail == "422 invalid"


def test_audit_retention_deletes_old_rows(tmp_path):
    path = tmp_path / "a.sqlite"
    log = AuditLog(path)
    log.prompts("/v1/detect", "127.0.0.1", ["x", "y"], [1.0, 0.1], 0.5)
    log.flush()
    with log._conn:
        log._conn.execute("UPDATE audit SET time = time - 10 * 86400 WHERE prompt_hash = ?",
                          (prompt_hash("x"),))
    log.close()
    log = AuditLog(path, retention_days=7)
    rows = log.rows()
    log.close()
    assert [r.prompt_hash for r in rows] == [prompt_hash("y")]
    assert rows[0].decision == "clear"


def test_explain_returns_attributions_triggers_and_clearing_edits(client, engine, memorized):
    r = client.post("/v1/explain", json={"prompt": memorized.prompt})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["flagged"] and body["score"] > body["threshold"]
    assert sum(w["score"] for w in body["words"]) == pytest.approx(1, abs=1e-4)
    triggers = {w["text"] for w in body["words"] if w["trigger"]}
    assert triggers and triggers <= set(memorized.trigger_tokens)
    for w in body["words"]:  # spans point at the word in the prompt
        assert memorized.prompt[w["span"][0] : w["span"][1]] == w["text"]
    edit = body["suggestions"][0]
    assert edit["clears"] and edit["score"] <= body["threshold"] and edit["label"]
    again = client.post("/v1/detect", json={"prompts": [edit["prompt"]]}).json()["results"][0]
    assert again["score"] == pytest.approx(edit["score"], rel=1e-4, abs=1e-5)
    # the edit clears the first-step estimate; whether it stops the copying is the verdict's
    assert not again["estimate"]["flagged"] and again["source"] == "generation"


def test_generate_plain_and_mitigated_with_nearest_training_image(client, memorized):
    from PIL import Image

    r = client.post("/v1/generate", json={"prompt": memorized.prompt, "mitigate": "auto",
                                          "steps": 10, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body["images"]) == {"plain", "mitigated"}
    assert body["detection"]["flagged"]
    verdict = body["images"]["mitigated"]["verdict"]  # auto is the guard, as on the CLI
    assert verdict["status"] in ("mitigated", "unresolved") and verdict["watch"] == "gate"
    assert verdict["verified"] == (body["images"]["mitigated"].get("nearest") is not None)
    for entry in body["images"].values():
        img = Image.open(io.BytesIO(base64.b64decode(entry["png"])))
        assert img.size == (64, 64)
        near = entry["nearest"]
        assert near["caption"] and near["png"] and near["criterion"]
    assert body["images"]["plain"]["png"] != body["images"]["mitigated"]["png"]
    none = client.post("/v1/generate", json={"prompt": memorized.prompt, "mitigate": "none",
                                             "steps": 2}).json()
    assert set(none["images"]) == {"plain"}
    alone = client.post("/v1/generate", json={"prompt": memorized.prompt, "mitigate": "ren",
                                              "compare": False, "steps": 2}).json()
    assert set(alone["images"]) == {"mitigated"}
    detected = client.post("/v1/detect", json={"prompts": [memorized.prompt]}).json()
    assert alone["detection"]["score"] == pytest.approx(detected["results"][0]["score"], rel=1e-4)
    assert alone["detection"]["flagged"]


def test_generate_without_index_has_no_nearest_and_amg_is_refused(engine, memorized):
    from diffmem.server.engine import Engine

    bare = Engine(engine.adapter, engine.threshold)
    with TestClient(create_app(bare)) as c:
        r = c.post("/v1/generate", json={"prompt": "a cat", "mitigate": "none", "steps": 2})
        assert r.status_code == 200 and r.json()["images"]["plain"].get("nearest") is None
        assert "index" in _one_line_error(c.post("/v1/generate", json={
            "prompt": memorized.prompt, "mitigate": "amg", "steps": 2}), 422)
        assert c.get("/healthz").json()["index"] is False


def test_compute_timeout_is_504_and_the_server_keeps_serving(engine):
    with TestClient(create_app(engine, ServerConfig(timeout_s=0.3))) as c:
        t0 = time.monotonic()
        r = c.post("/v1/generate", json={"prompt": "a cat", "mitigate": "none", "steps": 50})
        assert "longer than the limit" in _one_line_error(r, 504)
        assert time.monotonic() - t0 < 5
        assert c.post("/v1/detect", json={"prompts": ["a cat"]}).status_code == 200


def test_queue_limit_is_503_with_retry_after(engine):
    with TestClient(create_app(engine, ServerConfig(max_queue=2))) as c:
        r = c.post("/v1/detect", json={"prompts": ["a", "b", "c"]})
        assert "server busy" in _one_line_error(r, 503)
        assert int(r.headers["retry-after"]) >= 1


def test_metrics_healthz_openapi_docs_and_page(client):
    client.post("/v1/detect", json={"prompts": ["a cat", "a dog"]})
    client.post("/v1/detect", json={"prompts": []})
    text = client.get("/metrics").text
    assert 'diffmem_requests_total{endpoint="/v1/detect",status="200"} 1' in text
    assert 'diffmem_requests_total{endpoint="/v1/detect",status="422"} 1' in text
    assert "diffmem_batch_prompts_sum 2" in text
    assert 'diffmem_request_seconds_bucket{endpoint="/v1/detect",le="+Inf"} 2' in text
    assert 'diffmem_prompts_total{decision="clear"} 2' in text
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and "auto" in health["mitigations"]
    spec = client.get("/openapi.json").json()
    assert {"/v1/detect", "/v1/explain", "/v1/generate", "/healthz", "/metrics"} <= set(spec["paths"])
    assert spec["components"]["schemas"]["DetectRequest"]["properties"]["prompts"]["maxItems"] == 32
    docs = client.get("/docs")
    assert docs.status_code == 200 and "cdn." not in docs.text  # Swagger UI works offline
    js = re.search(r'src="([^"]+swagger-ui-bundle\.js)"', docs.text).group(1)
    assert client.get(js).status_code == 200
    page = client.get("/").text
    for element in ('id="prompt"', 'id="status"', 'id="words"', 'id="edits"', 'id="generate"'):
        assert element in page
    assert json.loads(client.get("/nope").text) == {"error": "not found: /nope"}


def test_config_is_frozen_and_resolved_up_front(engine):
    import dataclasses

    from diffmem.runtime.errors import DiffmemError

    cfg = ServerConfig()
    app = create_app(engine, cfg)
    assert cfg.max_tokens is None and cfg.model_name is None  # the caller's config is untouched
    resolved = app.state.guard.config
    assert resolved.max_tokens == engine.context_tokens and resolved.model_name == "testbed"
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.max_tokens = 1
    with pytest.raises(DiffmemError, match="max_prompts must be >= 1"):
        create_app(engine, ServerConfig(max_prompts=0))
    with pytest.raises(DiffmemError, match="timeout must be > 0"):
        create_app(engine, ServerConfig(timeout_s=0))

"""The service under faults, overload and hostile input (issue 24): a locked audit database, a
client that disconnects, work past its time limit, SIGTERM during work, full queues, secrets in
paths / prompts / option values, forged X-Forwarded-For and Host headers."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
from fastapi.testclient import TestClient

from diffmem.server.app import ServerConfig, create_app
from diffmem.server.audit import AuditLog

SECRET = "zq7secret"


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _wait(cond, timeout: float = 10.0, every: float = 0.02) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return True
        time.sleep(every)
    return cond()


@contextmanager
def locked(path, seconds_max: float = 30.0):
    """Another connection holds the database with BEGIN EXCLUSIVE until the block ends."""
    conn = sqlite3.connect(path, timeout=0.1, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        conn.execute("COMMIT")
        conn.close()


def _scored(rows):
    return [r for r in rows if r.decision in ("flagged", "clear")]


# ------------------------------------------------------------------------------ audit faults


def test_locked_audit_fails_readiness_counts_failures_and_writes_every_row_once_unlocked(
        engine, tmp_path):
    path = tmp_path / "audit.sqlite"
    audit = AuditLog(path, retry_s=0.5, busy_timeout_s=0.05)
    with TestClient(create_app(engine, audit=audit)) as c:
        assert c.get("/readyz").status_code == 200
        with locked(path):
            for i in range(3):
                r = c.post("/v1/detect", json={"prompts": [f"a cat {i}", f"a dog {i}"]})
                assert r.status_code == 200  # default mode: keep serving, rows stay queued
            assert _wait(lambda: c.get("/readyz").status_code == 503, 10)
            ready = c.get("/readyz").json()
            assert "audit" in ready["error"] and "locked" in ready["checks"]["audit"]
            assert c.get("/healthz").status_code == 503
            metrics = c.get("/metrics").text
            assert _metric(metrics, 'diffmem_audit_failures_total{kind="locked"}') >= 1
            assert _metric(metrics, "diffmem_audit_queue_rows") == 6
            assert _metric(metrics, "diffmem_ready") == 0
        assert audit.flush(10)
        assert c.get("/readyz").status_code == 200
    rows = audit.rows()
    audit.close()
    assert len(_scored(rows)) == 6 and audit.dropped == 0


def test_fail_closed_sends_no_200_without_its_row(engine, tmp_path):
    path = tmp_path / "audit.sqlite"
    audit = AuditLog(path, retry_s=0.4, busy_timeout_s=0.05)
    ok_prompts = 0
    with TestClient(create_app(engine, ServerConfig(audit_fail_closed=True), audit=audit)) as c:
        r = c.post("/v1/detect", json={"prompts": ["before"]})
        assert r.status_code == 200
        ok_prompts += 1
        with locked(path):
            for i in range(4):
                r = c.post("/v1/detect", json={"prompts": [f"p{i}"]})
                assert r.status_code == 503, r.text
                assert "audit" in r.json()["error"] and int(r.headers["retry-after"]) >= 1
            assert c.get("/readyz").status_code == 503
        assert _wait(lambda: c.get("/readyz").status_code == 200, 10)
        r = c.post("/v1/detect", json={"prompts": ["after", "again"]})
        assert r.status_code == 200
        ok_prompts += 2
    rows = audit.rows()
    audit.close()
    # every 200 has its rows, no answer that was withheld has one
    assert len(_scored(rows)) == ok_prompts
    assert all(r.detail == "503 audit_unavailable" for r in rows if r.decision == "rejected")


def test_audit_writer_survives_errors_and_reports_a_full_queue(tmp_path):
    audit = AuditLog(tmp_path / "a.sqlite", max_queue=3, retry_s=0.3)
    with locked(tmp_path / "a.sqlite"):
        assert audit.prompts("/v1/detect", "127.0.0.1", ["a", "b"], [1, 2], 0.5) is not None
        assert audit.prompts("/v1/detect", "127.0.0.1", ["c", "d"], [1, 2], 0.5) is None
        assert audit.dropped == 2 and not audit.healthy  # counted, and readiness would fail
    assert audit.flush(10) and len(audit.rows()) == 2
    assert _wait(lambda: audit.healthy, 5)
    audit.close()


# ------------------------------------------------------------------------------ hostile input


def test_the_audit_never_holds_request_text(engine, tmp_path, memorized):
    path = tmp_path / "audit.sqlite"
    audit = AuditLog(path)
    with TestClient(create_app(engine, ServerConfig(api_key="k"), audit=audit)) as c:
        key = {"X-API-Key": "k"}
        assert c.post(f"/v1/my {SECRET} prompt", json={}, headers=key).status_code == 404
        assert c.get(f"/v1/detect?{SECRET}=1", headers=key).status_code == 405
        assert c.post(f"/v1/{SECRET}/../detect", headers=key).status_code in (400, 404, 422)
        assert c.post("/v1/detect", json={"prompts": [f"{SECRET} a cat"]},
                      headers={"X-API-Key": SECRET}).status_code == 401
        assert c.post("/v1/detect", json={"prompts": [f"{SECRET} a cat"]},
                      headers=key).status_code == 200
        assert c.post("/v1/detect", json={"prompts": ["x"], SECRET: 1},
                      headers=key).status_code == 422
        assert c.post("/v1/detect", json={"prompts": [SECRET * 300]},
                      headers=key).status_code == 422
        assert c.post("/v1/explain", json={"prompt": "a cat", "top_k": SECRET},
                      headers=key).status_code == 422
        assert c.post("/v1/generate", json={"prompt": "a cat", "mitigate": f"ren:{SECRET}"},
                      headers=key).status_code == 422
        assert c.post("/v1/generate", json={"prompt": "a cat", "mitigate": SECRET},
                      headers=key).status_code == 422
        assert c.post("/v1/detect", content=f'{{"prompts": ["{SECRET}"'.encode(),
                      headers={**key, "content-type": "application/json"}).status_code == 400
        r = c.post("/v1/generate", json={"prompt": f"{SECRET} {memorized.prompt}",
                                         "mitigate": "ren:1.5", "steps": 2}, headers=key)
        assert r.status_code == 200
    rows = audit.rows()
    audit.close()
    assert len(rows) == 12
    for row in rows:
        assert SECRET not in repr(row).lower()
        assert row.endpoint in ("/v1/detect", "/v1/explain", "/v1/generate", "other")
        assert row.detail is None or re.fullmatch(r"\d{3} [a-z_]+|mitigate=[a-z0-9:.,]+",
                                                  row.detail), row.detail
    assert [r.detail for r in rows if r.endpoint == "other"] == ["404 not_found"]
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert SECRET.encode() not in raw.lower()  # nor anywhere in the file (or its WAL)


def test_forged_forwarded_for_is_ignored_unless_the_proxy_is_configured(engine, tmp_path, serve):
    for allow, expect in ((None, "127.0.0.1"), ("127.0.0.1", "6.6.6.6")):
        audit = AuditLog(tmp_path / f"a{allow}.sqlite")
        app = create_app(engine, ServerConfig(forwarded_allow_ips=allow), audit=audit)
        with serve(app) as url:
            r = httpx.post(url + "/v1/detect", json={"prompts": ["a cat"]},
                           headers={"X-Forwarded-For": "6.6.6.6"}, timeout=60)
            assert r.status_code == 200
        rows = audit.rows()
        audit.close()
        assert [row.client for row in rows] == [expect]


def test_host_allow_list_on_loopback_and_keys_compared_as_bytes(engine):
    key = "clé-🔑"
    app = create_app(engine, ServerConfig(host="127.0.0.1", api_key=key))
    body = {"prompts": ["a cat"]}
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        good = {"X-API-Key": key.encode("utf-8")}
        assert c.post("/v1/detect", json=body, headers=good).status_code == 200
        assert c.post("/v1/detect", json=body,
                      headers={"Authorization": b"Bearer " + key.encode()}).status_code == 200
        assert c.post("/v1/detect", json=body,
                      headers={"X-API-Key": key.encode("latin-1", "replace")}).status_code == 401
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
            r = c.post("/v1/detect", json=body, headers={**good, "Host": host})
            assert r.status_code == 400 and "Host" in r.json()["error"]
            assert c.get("/", headers={"Host": host}).status_code == 400
        for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
            assert c.get("/livez", headers={"Host": host}).status_code == 200
    with TestClient(create_app(engine, ServerConfig(host="0.0.0.0"))) as c:
        assert c.get("/livez", headers={"Host": "guard.example"}).status_code == 200


def test_page_is_served_with_csp_and_frame_headers(client_app):
    c = client_app
    r = c.get("/")
    csp = r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'sha256-" in csp
    assert "unsafe-inline" not in csp and "default-src 'none'" in csp
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert 'style="' not in r.text  # inline style attributes would be blocked by the CSP
    assert "sessionStorage" in r.text and "localStorage" not in r.text
    assert "AbortController" in r.text
    api = c.post("/v1/detect", json={"prompts": ["a"]})
    assert api.headers["x-frame-options"] == "DENY"


@pytest.fixture
def client_app(engine):
    with TestClient(create_app(engine)) as c:
        yield c


# ------------------------------------------------------------------------------ admission


def test_full_pool_and_in_flight_limit_answer_503_with_retry_after(engine, memorized):
    app = create_app(engine, ServerConfig(workers=1, max_pending=0, max_steps=400))
    gen = {"prompt": memorized.prompt, "mitigate": "none", "steps": 400}

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t",
                                         timeout=60) as c:
                first = asyncio.create_task(c.post("/v1/generate", json=gen))
                while app.state.guard.jobs == 0:
                    await asyncio.sleep(0.01)
                second = await c.post("/v1/explain", json={"prompt": "a cat"})
                for cancel in app.state.guard.cancels:  # end the long one early
                    cancel.set()
                return second, await first

    second, first = asyncio.run(main())
    assert second.status_code == 503 and int(second.headers["retry-after"]) >= 1
    assert "server busy" in second.json()["error"]
    assert first.status_code == 503  # cancelled by the server
    text = app.state.guard.metrics.render()
    assert _metric(text, 'diffmem_rejections_total{status="503",reason="queue_full"}') == 1

    app = create_app(engine, ServerConfig(max_in_flight=1, max_wait_ms=200))

    async def two():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t",
                                         timeout=60) as c:
                return await asyncio.gather(*(c.post("/v1/detect", json={"prompts": ["a"]})
                                              for _ in range(2)))

    statuses = sorted(r.status_code for r in asyncio.run(two()))
    assert statuses == [200, 503]


def test_explain_past_its_time_limit_is_504_and_stops_computing(engine, memorized):
    calls = []

    def slow(*a):  # every UNet call takes >= 50 ms, so the explain outlasts 0.2 s on any machine
        calls.append(time.monotonic())
        time.sleep(0.05)

    handle = engine.adapter.unet.register_forward_pre_hook(slow)
    try:
        app = create_app(engine, ServerConfig(timeout_s=0.2))
        with TestClient(app) as c:
            r = c.post("/v1/explain", json={"prompt": memorized.prompt})
            assert r.status_code == 504 and "cancelled" in r.json()["error"]
            t_answer = time.monotonic()
            assert _wait(lambda: app.state.guard.jobs == 0, 5)
            n = len(calls)
            time.sleep(0.3)
            assert len(calls) == n  # nothing runs any more
            assert not [t for t in calls if t > t_answer + 0.5]
            text = c.get("/metrics").text
            assert _metric(text, 'diffmem_cancelled_total{endpoint="/v1/explain",'
                                 'reason="timeout"}') == 1
    finally:
        handle.remove()


def test_a_disconnect_cancels_the_generation_within_one_step(engine, memorized, serve):
    calls = []
    handle = engine.adapter.unet.register_forward_pre_hook(
        lambda *a: calls.append(time.monotonic()))
    app = create_app(engine, ServerConfig(max_steps=500))
    state = app.state.guard
    try:
        with serve(app) as url:
            def client():
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(url + "/v1/generate", json={"prompt": memorized.prompt,
                                                           "mitigate": "none", "steps": 500,
                                                           "compare": False}, timeout=1.0)

            t = threading.Thread(target=client)
            t.start()
            assert _wait(lambda: state.cancels, 10)
            cancel = next(iter(state.cancels))
            assert _wait(cancel.is_set, 10, every=0.001)  # the client timed out and left
            t_cancel = time.monotonic()
            t.join()
            assert _wait(lambda: state.jobs == 0, 5)
            after = [x for x in calls if x > t_cancel]
            assert len(after) <= 1, len(after)  # at most the step already started
            assert len(calls) < 450  # far from the 500 steps asked for
            text = httpx.get(url + "/metrics").text
            assert _metric(text, 'diffmem_cancelled_total{endpoint="/v1/generate",'
                                 'reason="disconnect"}') == 1
    finally:
        handle.remove()


def test_readiness_and_liveness_see_a_dead_batcher(client_app):
    c = client_app
    assert c.get("/livez").status_code == 200 and c.get("/readyz").status_code == 200
    state = c.app.state.guard
    task = state.batcher._task
    task.get_loop().call_soon_threadsafe(task.cancel)  # the batcher dies
    assert _wait(lambda: not state.batcher.alive, 5)
    assert c.get("/livez").status_code == 503
    r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"]["batcher"] == "not running"
    text = c.get("/metrics").text
    assert "diffmem_build_info{version=" in text and "diffmem_in_flight_requests" in text


# ------------------------------------------------------------------------------ shutdown


def test_sigterm_lets_short_work_finish_cancels_long_work_and_exits_0(tmp_path, testbed_threshold):
    from tests.server.conftest import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffmem.cli", "serve", "--model", "testbed", "--port", str(port),
         "--threshold", repr(testbed_threshold), "--max-steps", "500", "--shutdown-timeout",
         "2", "--audit-db", str(tmp_path / "a.sqlite"), "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert _wait(lambda: _ready(url), 120, every=0.3), "server did not start"
        out = {}

        def call(name, path, body):
            try:
                out[name] = httpx.post(url + path, json=body, timeout=60).status_code
            except httpx.HTTPError as e:
                out[name] = type(e).__name__

        long = threading.Thread(target=call, args=("long", "/v1/generate", {
            "prompt": "a cat", "mitigate": "none", "steps": 500, "compare": False}))
        long.start()
        assert _wait(lambda: "diffmem_work_queue 1" in httpx.get(url + "/metrics").text, 30)
        short = threading.Thread(target=call, args=("short", "/v1/detect",
                                                    {"prompts": ["a dog"]}))
        short.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        took = time.monotonic() - t0
        long.join(10)
        short.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, proc.stderr.read().decode()[-2000:]
    assert took < 2 + 5  # the window, then the cancelled work stops within a step
    assert out["short"] == 200
    assert out["long"] != 200  # cancelled at the end of the window
    rows = AuditLog(tmp_path / "a.sqlite").rows()
    assert len(_scored(rows)) == 1  # the detect that finished


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False

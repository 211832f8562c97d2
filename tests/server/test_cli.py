"""``diffmem serve``: parser wiring, the app it builds, and bad options as one-line errors."""

from __future__ import annotations

import pytest

from diffmem.cli import build_parser, main


def test_serve_builds_the_app_and_runs_uvicorn(tiny_pipe, tmp_path, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient

    import diffmem.server
    from diffmem.models.adapter import load_adapter

    seen, built = {}, {}
    real_build = diffmem.server.build_engine

    def build(model, **kw):  # the tiny pipeline object instead of a folder (loads in ms)
        built.update(model=model, **kw)
        return real_build(load_adapter(tiny_pipe), **kw)

    def fake_run(app, host, port, log_level, **options):
        seen.update(app=app, host=host, port=port, options=options)

    monkeypatch.setattr(diffmem.server, "build_engine", build)
    monkeypatch.setattr(uvicorn, "run", fake_run)
    key = tmp_path / "key"
    key.write_text("abc\n")
    rc = main(["serve", "--model", "somewhere", "--threshold", "0.5", "--port", "8123",
               "--api-key-file", str(key), "--audit-db", str(tmp_path / "a.sqlite"),
               "--max-prompts", "4", "--max-batch", "8"])
    assert rc == 0 and seen["host"] == "127.0.0.1" and seen["port"] == 8123
    assert built["model"] == "somewhere" and built["threshold"] == 0.5
    assert built["index"] is None and built["max_batch"] == 8
    opts = seen["options"]
    assert opts["proxy_headers"] is False and opts["limit_concurrency"] == 256
    assert opts["timeout_graceful_shutdown"] == 20.0
    with TestClient(seen["app"]) as c:  # Host: testserver is not a loopback name
        assert c.get("/healthz").status_code == 400
    with TestClient(seen["app"], base_url="http://127.0.0.1:8123") as c:
        health = c.get("/healthz").json()
        assert health["threshold"] == 0.5 and health["auth"] is True
        assert health["model"] == "somewhere"
        assert health["limits"]["max_prompts"] == 4
        assert c.post("/v1/detect", json={"prompts": ["x"]}).status_code == 401
        assert c.post("/v1/detect", json={"prompts": ["x"]},
                      headers={"Authorization": "Bearer abc"}).status_code == 200


@pytest.mark.parametrize("content", ["", "a\nb\n"])
def test_bad_api_key_file_is_one_line_error(tmp_path, capsys, content):
    key = tmp_path / "key"
    key.write_text(content)
    assert main(["serve", "--api-key-file", str(key), "--threshold", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffmem: error:") and "one non-empty line" in err and "\n" not in err


def test_missing_api_key_file(tmp_path, capsys):
    assert main(["serve", "--api-key-file", str(tmp_path / "nope")]) == 2
    assert "cannot read the API key file" in capsys.readouterr().err


def test_serve_defaults():
    a = build_parser().parse_args(["serve"])
    assert (a.model, a.host, a.port, a.index, a.threshold) == ("testbed", "127.0.0.1", 8000,
                                                              None, None)


def test_serve_options_reach_the_config_and_a_keyless_public_bind_warns(tiny_pipe, monkeypatch,
                                                                         capsys):
    import uvicorn

    import diffmem.server
    from diffmem.models.adapter import load_adapter

    seen = {}
    real_build = diffmem.server.build_engine
    monkeypatch.setattr(diffmem.server, "build_engine",
                        lambda model, **kw: real_build(load_adapter(tiny_pipe), **kw))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    rc = main(["serve", "--threshold", "0.5", "--host", "0.0.0.0", "--max-queue", "64",
               "--max-queue-wait", "7", "--max-pending", "3", "--max-in-flight", "9",
               "--max-connections", "20", "--shutdown-timeout", "4",
               "--forwarded-allow-ips", "10.0.0.1", "--allowed-hosts", "guard.example"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "warning: serving on 0.0.0.0, beyond loopback, without an API key" in err
    cfg = seen["app"].state.guard.config
    assert (cfg.max_queue, cfg.max_queue_wait_s, cfg.max_pending, cfg.max_in_flight) == \
        (64, 7.0, 3, 9)
    assert cfg.allowed_hosts == ("guard.example",)
    assert seen["proxy_headers"] is True and seen["forwarded_allow_ips"] == "10.0.0.1"
    assert seen["limit_concurrency"] == 20 and seen["timeout_graceful_shutdown"] == 4.0


def test_loopback_serve_does_not_warn(tiny_pipe, monkeypatch, capsys):
    import uvicorn

    import diffmem.server
    from diffmem.models.adapter import load_adapter

    real_build = diffmem.server.build_engine
    monkeypatch.setattr(diffmem.server, "build_engine",
                        lambda model, **kw: real_build(load_adapter(tiny_pipe), **kw))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    assert main(["serve", "--threshold", "0.5"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_fail_closed_needs_an_audit_db(capsys):
    assert main(["serve", "--threshold", "1", "--audit-fail-closed"]) == 2
    assert "--audit-fail-closed needs --audit-db" in capsys.readouterr().err

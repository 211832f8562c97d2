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

    def fake_run(app, host, port, log_level):
        seen.update(app=app, host=host, port=port)

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
    with TestClient(seen["app"]) as c:
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

"""The service's verdict by generation: /v1/detect and /v1/explain with an index, the estimate
without one, and an index of another model's images refused."""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient

from diffmem.server.app import ServerConfig, create_app

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def client(engine):
    with TestClient(create_app(engine, ServerConfig(model_name="testbed"))) as c:
        yield c


def test_detect_decides_by_generation_with_the_evidence(client, engine, memorized):
    r = client.post("/v1/detect", json={"prompts": [memorized.prompt, "a red circle"],
                                        "evidence": True})
    assert r.status_code == 200, r.text
    copy, clean = r.json()["results"]
    for res in (copy, clean):
        assert res["source"] == "generation" and res["note"] is None
        assert res["flagged"] == res["verdict"]["copies"]
        assert res["estimate"] == {"score": res["score"], "threshold": engine.threshold,
                                   "flagged": res["score"] > engine.threshold}
        for key in ("preview_png", "nearest_png"):
            assert base64.b64decode(res["verdict"][key])[:8] == PNG
    assert copy["verdict"]["copies"] is True and clean["verdict"]["copies"] is False
    assert copy["verdict"]["criterion"] == "tiled_l2" and copy["verdict"]["copy_threshold"] == 0.15
    assert copy["verdict"]["method"] == "4 previews of 20 steps searched in the training index"
    # the same verdict as the library's preview replication
    from diffmem.detect import PreviewReplication

    [margin] = PreviewReplication(engine.index).score(engine.adapter, [memorized.prompt])
    assert copy["verdict"]["margin"] == pytest.approx(float(margin), abs=1e-6)
    # without evidence: no images; verdict "estimate": the fast first-step score only
    r = client.post("/v1/detect", json={"prompts": [memorized.prompt]}).json()["results"][0]
    assert "preview_png" not in r["verdict"] or r["verdict"]["preview_png"] is None
    r = client.post("/v1/detect", json={"prompts": [memorized.prompt], "verdict": "estimate"})
    est = r.json()["results"][0]
    assert est["source"] == "first_step_estimate" and est["verdict"] is None
    assert "--index" in est["note"]
    assert client.get("/healthz").json()["verdict"] == "generation"


def test_explain_decides_by_generation(client, memorized):
    r = client.post("/v1/explain", json={"prompt": memorized.prompt})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["source"] == "generation" and body["flagged"] is True
    assert body["verdict"]["copies"] is True and body["estimate"]["threshold"] == body["threshold"]
    assert base64.b64decode(body["verdict"]["nearest_png"])[:8] == PNG
    assert body["suggestions"]


def test_without_an_index_the_verdict_is_an_estimate(tiny_engine):
    with TestClient(create_app(tiny_engine)) as c:
        r = c.post("/v1/detect", json={"prompts": ["a red circle"]}).json()["results"][0]
        assert r["source"] == "first_step_estimate" and r["verdict"] is None
        assert r["flagged"] == r["estimate"]["flagged"] and "first-step estimate" in r["note"]
        bad = c.post("/v1/detect", json={"prompts": ["a"], "verdict": "generation"})
        assert bad.status_code == 422 and "index" in bad.json()["error"]
        assert c.get("/healthz").json()["verdict"] == "first_step_estimate"


def test_an_index_of_other_images_is_refused(testbed_adapter, testbed_threshold, tiny_pipe,
                                             tmp_path, capsys):
    import torch

    from diffmem.cli import main
    from diffmem.runtime.errors import ConfigError
    from diffmem.server.engine import Engine
    from diffmem.similarity.index import PixelSpace, TrainingIndex

    other = TrainingIndex.build(torch.zeros(2, 3, 64, 64), [["a"], ["b"]], ["x0", "x1"],
                                PixelSpace(size=64))  # records no training set
    with pytest.raises(ConfigError, match="index"):
        Engine(testbed_adapter, testbed_threshold, index=other)
    other.save(tmp_path / "other")
    rc = main(["serve", "--index", str(tmp_path / "other")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("diffmem: error: the service's index (--index): ")

"""One loaded model shared by concurrent detect, explain and generate requests on a live server:
every answer is a 200 and equals the answer the same request gets alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from diffmem.server.app import ServerConfig, create_app


def test_mixed_concurrent_requests_match_their_answers_alone(engine, memorized, heldout, serve):
    detect = [{"prompts": [memorized.prompt, *heldout[i : i + 3]]} for i in range(0, 24, 3)]
    explain = [{"prompt": memorized.prompt}, {"prompt": heldout[0]}]
    generate = [{"prompt": memorized.prompt, "mitigate": "auto", "steps": 3, "seed": s}
                for s in range(2)]
    jobs = ([("/v1/detect", b) for b in detect] + [("/v1/explain", b) for b in explain]
            + [("/v1/generate", b) for b in generate])
    with serve(create_app(engine, ServerConfig(workers=3))) as url, httpx.Client() as c:
        def call(job):
            r = c.post(url + job[0], json=job[1], timeout=120)
            assert r.status_code == 200, r.text
            return r.json()

        alone = [call(j) for j in jobs]
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(call, jobs))
    for (path, _), a, b in zip(jobs, alone, together, strict=True):
        if path == "/v1/detect":
            for x, y in zip(a["results"], b["results"], strict=True):
                assert y["score"] == pytest.approx(x["score"], rel=1e-4, abs=1e-5)
        elif path == "/v1/explain":
            assert [w["text"] for w in a["words"]] == [w["text"] for w in b["words"]]
            for x, y in zip(a["words"], b["words"], strict=True):
                assert y["score"] == pytest.approx(x["score"], abs=1e-3)
            assert [s["prompt"] for s in a["suggestions"]] == [s["prompt"] for s in b["suggestions"]]
        else:
            assert b["detection"]["score"] == pytest.approx(a["detection"]["score"], rel=1e-4)
            assert set(b["images"]) == set(a["images"]) == {"plain", "mitigated"}


def test_locked_tokenizer_serializes_calls_and_delegates():
    import threading
    import time

    from diffmem.server.engine import _LockedTokenizer

    class Fake:
        model_max_length = 77

        def __init__(self):
            self.inside, self.overlaps = 0, 0

        def __call__(self, text, **kw):
            self.inside += 1
            if self.inside > 1:
                self.overlaps += 1
            time.sleep(0.002)
            self.inside -= 1
            return text

        def convert_ids_to_tokens(self, ids):
            return self(ids)

    fake = Fake()
    tok = _LockedTokenizer(fake, threading.RLock())
    threads = [threading.Thread(target=lambda: [tok("x") or tok.convert_ids_to_tokens([1])
                                                for _ in range(20)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake.overlaps == 0
    assert tok.model_max_length == 77
    tok.model_max_length = 10
    assert fake.model_max_length == 10

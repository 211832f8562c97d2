"""Fixtures of the service tests: the testbed's labelled prompts, its calibrated threshold, an
engine on the testbed and on the tiny random pipeline, and a real uvicorn server on loopback."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from diffmem.testbed import spec_of

pytest.importorskip("fastapi", reason="the service needs fastapi (pip install -e '.[dev]')")


@pytest.fixture(scope="session")
def testbed_data(testbed_adapter):
    from diffmem.testbed.data import build_testbed

    return build_testbed(spec_of(testbed_adapter))


@pytest.fixture(scope="session")
def memorized(testbed_data):
    """A verbatim memorized prompt of the testbed, with its trigger words."""
    return next(p for p in testbed_data.prompts if p.kind == "verbatim")


@pytest.fixture(scope="session")
def heldout(testbed_data):
    return [p.prompt for p in testbed_data.prompts if p.kind == "heldout"]


@pytest.fixture(scope="session")
def testbed_threshold(testbed_adapter, heldout):
    """The threshold the service calibrates by default: first-step noise magnitude at 1% FPR on
    the held-out prompts (diffmem.mitigate.default_threshold), from the prompts built once."""
    from diffmem.detect import NoiseMagnitude

    return float(NoiseMagnitude(steps=1).fit(testbed_adapter, heldout).threshold_)


@pytest.fixture(scope="session")
def small_index(testbed_data, testbed_adapter):
    """A pixel index of the testbed's memorized training images only (fast to build), recording
    the testbed's training set (the engine refuses an index of another model's images)."""
    import numpy as np

    from diffmem.similarity.index import PixelSpace, TrainingIndex
    from diffmem.similarity.index_compat import model_training_set
    from diffmem.similarity.pixel import to_tensor
    from diffmem.testbed.verify import vae_roundtrip

    items, arrays = [], []
    for item, img in testbed_data.images(kinds=("verbatim", "template")):
        items.append(item)
        arrays.append(img)
    # as `diffmem index build testbed` stores them: rendered by the model's VAE
    import torch

    with torch.no_grad():
        rendered = vae_roundtrip(testbed_adapter, to_tensor(np.stack(arrays)))
    index = TrainingIndex.build(rendered, [list(i.captions) for i in items],
                               [i.image_id for i in items],
                               PixelSpace(size=testbed_data.spec.resolution))
    index.provenance = {"training_set": model_training_set(testbed_adapter)}
    return index


@pytest.fixture(scope="session")
def engine(testbed_adapter, testbed_threshold, small_index):
    from diffmem.server.engine import Engine

    return Engine(testbed_adapter, testbed_threshold, index=small_index)


@pytest.fixture(scope="session")
def tiny_engine(tiny_pipe):
    """Engine on the tiny random SD1 pipeline, threshold halfway between two prompts' scores."""
    from diffmem.detect import NoiseMagnitude
    from diffmem.models.adapter import load_adapter
    from diffmem.server.engine import Engine

    adapter = load_adapter(tiny_pipe)
    scores = NoiseMagnitude(steps=1).score(adapter, ["a red circle", "a blue square"])
    return Engine(adapter, float(scores.mean()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app, timeout: float = 60.0):
    """Run ``app`` on uvicorn at 127.0.0.1:<free port> in a thread; yields the base URL."""
    import uvicorn

    from diffmem.server.app import uvicorn_options

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on",
                                           **uvicorn_options(app.state.guard.config)))
    thread = threading.Thread(target=server.run, daemon=True, name="uvicorn-test")
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - t0 > timeout:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def serve():
    """``with serve(app) as url:`` runs the app on uvicorn at 127.0.0.1 in a thread."""
    return live_server

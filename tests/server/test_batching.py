"""MicroBatcher: batches, order, cancellation, errors and the queue limit, with a fake model."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from diffmem.server.batching import MicroBatcher, QueueFull
from diffmem.server.metrics import Metrics


class FakeModel:
    def __init__(self, gate: threading.Event | None = None, fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.gate, self.fail = gate, fail

    def __call__(self, prompts):
        if self.gate is not None:
            self.gate.wait(5)
        self.calls.append(list(prompts))
        if self.fail:
            raise RuntimeError("model failed")
        return [float(len(p)) for p in prompts]


def _run(coro_fn, model, **kw):
    async def main():
        b = MicroBatcher(model, ThreadPoolExecutor(1), metrics=Metrics(), **kw)
        b.start()
        try:
            return await coro_fn(b)
        finally:
            await b.stop()
    return asyncio.run(main())


def test_concurrent_requests_fill_batches_in_order():
    model = FakeModel()
    reqs = [[f"p{i}-{j}" + "x" * j for j in range(3)] for i in range(10)]

    async def go(b):
        return await asyncio.gather(*(b.submit(r) for r in reqs))

    out = _run(go, model, max_batch=8, max_wait_s=0.2)
    assert out == [[float(len(p)) for p in r] for r in reqs]
    assert [len(c) for c in model.calls] == [8, 8, 8, 6]
    assert sorted(p for c in model.calls for p in c) == sorted(p for r in reqs for p in r)


def test_a_lone_request_waits_at_most_max_wait():
    model = FakeModel()

    async def go(b):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        out = await b.submit(["abc"])
        return out, loop.time() - t0

    out, took = _run(go, model, max_batch=16, max_wait_s=0.05)
    assert out == [3.0] and model.calls == [["abc"]]
    assert took < 2.0


def test_cancelled_requests_never_reach_the_model():
    gate = threading.Event()
    model = FakeModel(gate)

    async def go(b):
        first = asyncio.create_task(b.submit(["first"]))
        await asyncio.sleep(0.05)  # "first" is in the model (blocked on the gate)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(b.submit(["dropped"]), 0.05)
        gate.set()
        await first
        return await b.submit(["after"])

    assert _run(go, model, max_batch=4, max_wait_s=0.0) == [5.0]
    assert ["dropped"] not in model.calls and all("dropped" not in c for c in model.calls)


def test_model_errors_reach_every_waiting_request_and_the_batcher_goes_on():
    model = FakeModel(fail=True)

    async def go(b):
        results = await asyncio.gather(b.submit(["a"]), b.submit(["b"]), return_exceptions=True)
        model.fail = False
        return results, await b.submit(["ok"])

    results, after = _run(go, model, max_batch=4, max_wait_s=0.05)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert after == [2.0]


def test_queue_limit():
    async def go(b):
        with pytest.raises(QueueFull):
            await b.submit(["a", "b", "c"])
        return await b.submit(["a", "b"])

    assert _run(go, FakeModel(), max_batch=4, max_wait_s=0.0, max_queue=2) == [1.0, 1.0]

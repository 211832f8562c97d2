"""Micro-batching: prompts of requests that arrive together are scored in one UNet call.

Each request puts its prompts on one queue and awaits one future per prompt. A single task on the
event loop takes up to ``max_batch`` queued prompts (from one or several requests; a request may
be split over two batches) once the batch is full or the oldest queued prompt has waited
``max_wait_s``, and runs the scoring function in a worker thread, so the event loop never blocks
on the model. While a batch runs, the next one fills. Prompts whose request was cancelled (it
timed out or disconnected) are dropped before they reach the model.

Admission: a request is refused with :class:`QueueFull` when its prompts would take the queue
over ``max_queue`` prompts, or would wait longer than ``max_wait_queue_s`` by the measured
throughput (a moving average of the seconds per batch); the exception carries a Retry-After.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

from diffmem.server.metrics import Metrics


class QueueFull(Exception):
    """More prompts are waiting than the server accepts; ``retry_after`` in seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class MicroBatcher:
    """Collects prompts into batches of at most ``max_batch`` for ``score_fn(prompts) -> scores``
    (the service runs two: first-step scores, and the verdicts by generation of the previews)."""

    def __init__(self, score_fn: Callable[[list[str]], Sequence[float]], executor: Executor, *,
                 max_batch: int = 16, max_wait_s: float = 0.005, max_queue: int = 512,
                 max_wait_queue_s: float | None = None, metrics: Metrics | None = None,
                 convert: Callable = float) -> None:
        self.score_fn = score_fn
        #: each result through this before it reaches its request (float scores; the preview
        #: batcher's verdicts are dicts, passed as they are)
        self.convert = convert
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.max_wait_queue_s = max_wait_queue_s
        self.metrics = metrics
        #: seconds per batch (moving average of the measured batches; None before the first)
        self.batch_s: float | None = None
        #: the error of the last batch (None once a batch succeeds): readiness reports it
        self.last_error: str | None = None
        self._queue: collections.deque = collections.deque()  # (prompt, future, arrival time)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for _, fut, _ in self._queue:
            if not fut.done():
                fut.cancel()
        self._queue.clear()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def alive(self) -> bool:
        """The batching task is running."""
        return self._task is not None and not self._task.done()

    def expected_wait(self, n: int) -> float:
        """Seconds until ``n`` more prompts would be scored, by the measured batch time."""
        if self.batch_s is None:
            return 0.0
        batches = -(-(len(self._queue) + n) // self.max_batch) + 1  # + the batch running now
        return batches * self.batch_s

    def admit(self, n: int) -> None:
        """Raises :class:`QueueFull` when ``n`` more prompts would go over ``max_queue`` or wait
        longer than ``max_wait_queue_s``."""
        if len(self._queue) + n > self.max_queue:
            raise QueueFull(f"{len(self._queue)} prompts are queued (limit {self.max_queue})",
                            max(1.0, self.expected_wait(0) / 2))
        wait = self.expected_wait(n)
        if self.max_wait_queue_s is not None and wait > self.max_wait_queue_s:
            raise QueueFull(f"{len(self._queue)} prompts are queued, about {wait:.0f} s of work "
                            f"(limit {self.max_wait_queue_s:g} s)",
                            max(1.0, wait - self.max_wait_queue_s))

    async def submit(self, prompts: Sequence[str]) -> list[float]:
        """Scores of ``prompts`` in order, computed in whichever batches they land in."""
        if self._task is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        self.admit(len(prompts))
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures = [loop.create_future() for _ in prompts]
        self._queue.extend((p, f, now) for p, f in zip(prompts, futures, strict=True))
        self._set_gauge()
        self._wake.set()
        try:
            return list(await asyncio.gather(*futures))
        except asyncio.CancelledError:
            for f in futures:
                f.cancel()
            raise

    def _set_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue.set(len(self._queue))

    def _drop_cancelled(self) -> None:
        while self._queue and self._queue[0][1].done():
            self._queue.popleft()

    async def _loop(self) -> None:
        while True:
            self._drop_cancelled()
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            deadline = self._queue[0][2] + self.max_wait_s
            while len(self._queue) < self.max_batch:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except TimeoutError:
                    break
            batch = []
            while self._queue and len(batch) < self.max_batch:
                item = self._queue.popleft()
                if not item[1].done():
                    batch.append(item)
            self._set_gauge()
            if batch:
                await self._run(batch)

    async def _run(self, batch: list) -> None:
        prompts = [p for p, _, _ in batch]
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            scores = await loop.run_in_executor(self.executor, self.score_fn, prompts)
        except Exception as e:  # every waiting request gets the error
            self.last_error = type(e).__name__
            for _, fut, _ in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        took = time.perf_counter() - t0
        self.last_error = None
        # seconds per full batch, from batches at least half full (a lone prompt's batch says
        # little about a full one); the first batch seeds it
        if len(prompts) * 2 >= self.max_batch or self.batch_s is None:
            sample = took * max(1.0, self.max_batch / len(prompts)) \
                if len(prompts) * 2 >= self.max_batch else took
            self.batch_s = sample if self.batch_s is None else 0.8 * self.batch_s + 0.2 * sample
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(prompts))
            self.metrics.batch_seconds.observe(took)
        for (_, fut, _), s in zip(batch, scores, strict=True):
            if not fut.done():
                fut.set_result(self.convert(s))

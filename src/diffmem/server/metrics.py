"""Prometheus text-format metrics (exposition format 0.0.4) without a client library.

Counters and histograms with labels, safe to update from any thread; :meth:`Metrics.render` writes
the text that ``GET /metrics`` serves.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

#: latency buckets (seconds) and batch-size buckets (prompts per UNet call)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{_escape(str(v))}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Counter:
    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._values: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def inc(self, *labels: str, value: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + value

    def value(self, *labels: str) -> float:
        return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            items = sorted(self._values.items())
        out += [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in items]
        return out


class Gauge(Counter):
    def set(self, value: float, *labels: str) -> None:
        with self._lock:
            self._values[labels] = float(value)

    def render(self) -> list[str]:
        lines = super().render()
        lines[1] = f"# TYPE {self.name} gauge"
        return lines


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float],
                 labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self.buckets = tuple(sorted(buckets))
        self._data: dict[tuple, list] = {}  # labels -> [bucket counts..., count, sum]
        self._lock = threading.Lock()

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            d = self._data.setdefault(labels, [0] * len(self.buckets) + [0, 0.0])
            for i, b in enumerate(self.buckets):
                if value <= b:
                    d[i] += 1
            d[-2] += 1
            d[-1] += value

    def count(self, *labels: str) -> int:
        d = self._data.get(labels)
        return 0 if d is None else int(d[-2])

    def sum(self, *labels: str) -> float:
        d = self._data.get(labels)
        return 0.0 if d is None else float(d[-1])

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._data.items())
        for labels, d in items:
            for i, b in enumerate(self.buckets):
                lab = _labels((*self.label_names, "le"), (*labels, _num(b)))
                out.append(f"{self.name}_bucket{lab} {d[i]}")
            lab = _labels((*self.label_names, "le"), (*labels, "+Inf"))
            out.append(f"{self.name}_bucket{lab} {d[-2]}")
            out.append(f"{self.name}_count{_labels(self.label_names, labels)} {d[-2]}")
            out.append(f"{self.name}_sum{_labels(self.label_names, labels)} {_num(d[-1])}")
        return out


class Metrics:
    """The service's metrics: requests, latencies, micro-batch sizes and times, decisions,
    admission (in flight, queue depths, rejections by reason, cancellations), the audit log's
    failures and the build."""

    def __init__(self) -> None:
        self.requests = Counter("diffmem_requests_total", "HTTP requests by endpoint and status",
                                ("endpoint", "status"))
        self.latency = Histogram("diffmem_request_seconds", "request latency by endpoint",
                                 LATENCY_BUCKETS, ("endpoint",))
        self.batch_size = Histogram("diffmem_batch_prompts", "prompts per micro-batched UNet call",
                                    SIZE_BUCKETS)
        self.batch_seconds = Histogram("diffmem_batch_seconds", "time of one micro-batch",
                                       LATENCY_BUCKETS)
        self.prompts = Counter("diffmem_prompts_total", "scored prompts by decision",
                               ("decision",))
        self.rejections = Counter("diffmem_rejections_total",
                                  "rejected requests by status and reason", ("status", "reason"))
        self.queue = Gauge("diffmem_queue_prompts", "prompts waiting for a micro-batch")
        self.in_flight = Gauge("diffmem_in_flight_requests", "requests being served, by endpoint",
                               ("endpoint",))
        self.work_queue = Gauge("diffmem_work_queue", "explain / generate jobs admitted and not "
                                "finished (running or waiting for a worker)")
        self.cancelled = Counter("diffmem_cancelled_total", "work cancelled, by endpoint and "
                                 "reason (timeout, disconnect, shutdown)", ("endpoint", "reason"))
        self.audit_failures = Counter("diffmem_audit_failures_total", "failed audit writes by kind "
                                      "(locked, full, io, other); the rows are retried",
                                      ("kind",))
        self.audit_dropped = Counter("diffmem_audit_dropped_rows_total",
                                     "audit rows dropped because the audit queue was full")
        self.audit_queue = Gauge("diffmem_audit_queue_rows", "audit rows waiting to be written")
        self.ready = Gauge("diffmem_ready", "1 when the last readiness check passed")
        self.build_info = Gauge("diffmem_build_info", "1, labelled with the versions",
                                ("version", "python", "torch"))

    def render(self) -> str:
        lines: list[str] = []
        for m in (self.requests, self.latency, self.batch_size, self.batch_seconds, self.prompts,
                  self.rejections, self.queue, self.in_flight, self.work_queue, self.cancelled,
                  self.audit_failures, self.audit_dropped, self.audit_queue, self.ready,
                  self.build_info):
            lines += m.render()
        return "\n".join(lines) + "\n"

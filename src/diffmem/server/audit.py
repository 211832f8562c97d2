"""Audit log of the guard service in SQLite: one row per scored prompt or rejected request.

A row holds the time (Unix seconds), the client address (an IP address or ``invalid``), the
endpoint (a route of the service or ``other``), the SHA-256 of the prompt (never the prompt
itself), the score, the threshold and the decision (``flagged`` / ``clear`` / ``rejected``). A
rejected request is logged once, as ``"<status> <kind>"`` where the kind is a fixed word
(``not_found``, ``invalid``, ``unauthorized``, ...): no path, no message, nothing the client
sent. The ``detail`` column only ever holds such words, numbers and mitigation names (anything
else is stored as ``redacted``). Rows older than ``retention_days`` are deleted when the log opens
and then hourly.

Writes go through one background thread (the event loop never waits for the disk) that never
dies: a write that fails (database locked by another connection, disk full, I/O error) is retried
with backoff, the rows stay queued (up to ``max_queue``; beyond it a row is dropped, counted and
logged) and each failure is counted (``diffmem_audit_failures_total{kind}``) and logged.
:attr:`AuditLog.healthy` is false while rows have been failing for longer than ``retry_s`` (or
were dropped in the last ``retry_s``), so readiness fails; :class:`AuditTicket` lets a caller wait
for its own rows (fail-closed mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import queue
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("diffmem.server.audit")

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    client TEXT,
    endpoint TEXT NOT NULL,
    prompt_hash TEXT,
    score REAL,
    threshold REAL,
    decision TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS audit_time ON audit(time);
"""

PURGE_EVERY_S = 3600.0
_SAFE_DETAIL = re.compile(r"[A-Za-z0-9_.:,=+ -]{0,120}")
_KIND = re.compile(r"[a-z_]{1,40}")


def prompt_hash(prompt: str) -> str:
    """SHA-256 (hex) of the prompt's UTF-8 bytes."""
    return hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()


def safe_client(client: str | None) -> str | None:
    """The client address as stored: an IP address, else ``invalid`` (never free text)."""
    if client is None:
        return None
    try:
        return str(ipaddress.ip_address(client))
    except ValueError:
        return "invalid"


def safe_detail(detail: str | None) -> str | None:
    """``detail`` when it is only words, numbers and punctuation of a spec; else ``redacted``."""
    if detail is None:
        return None
    return detail if _SAFE_DETAIL.fullmatch(detail) else "redacted"


def failure_kind(exc: BaseException) -> str:
    """``locked``, ``full``, ``io`` or ``other`` for a failed write."""
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return "locked"
    if "full" in text or "no space" in text:
        return "full"
    if isinstance(exc, OSError) or "disk i/o" in text or "readonly" in text:
        return "io"
    return "other"


@dataclass(frozen=True)
class AuditRow:
    time: float
    client: str | None
    endpoint: str
    prompt_hash: str | None
    score: float | None
    threshold: float | None
    decision: str
    detail: str | None = None


class AuditTicket:
    """The rows of one request: written together, waited for, or withdrawn while still queued."""

    def __init__(self, rows: list[AuditRow]) -> None:
        self.rows = rows
        self.state = "pending"  # -> writing -> written | pending (retry); pending -> withdrawn
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._callbacks: list = []

    @property
    def written(self) -> bool:
        return self.state == "written"

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the rows were written within ``timeout`` seconds."""
        self._done.wait(timeout)
        return self.written

    async def wait_async(self, timeout: float) -> bool:
        """:meth:`wait` for the event loop (no thread waits)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def wake() -> None:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))

        with self._lock:
            if self._done.is_set():
                return self.written
            self._callbacks.append(wake)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fut, timeout)
        return self.written

    def withdraw(self) -> bool:
        """Take the rows back if they are not written or being written (true when withdrawn)."""
        with self._lock:
            if self.state != "pending":
                return self.state == "withdrawn"
            self.state = "withdrawn"
        self._finish()
        return True

    # writer side
    def _claim(self) -> bool:
        with self._lock:
            if self.state != "pending":
                return False
            self.state = "writing"
            return True

    def _settle(self, written: bool) -> None:
        with self._lock:
            self.state = "written" if written else "pending"
        if written:
            self._finish()

    def _finish(self) -> None:
        with self._lock:
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb()


class AuditLog:
    """SQLite audit log written by a background thread that retries and reports its failures.

    ``max_queue``: rows waiting to be written before new rows are dropped (counted and logged);
    ``retry_s``: how long rows may keep failing before :attr:`healthy` turns false (readiness
    fails); ``busy_timeout_s``: SQLite's own wait for a lock on each attempt. ``metrics`` (set by
    the app) gets the failure, drop and queue figures.
    """

    def __init__(self, path: str | Path, *, retention_days: float | None = None,
                 max_queue: int = 100_000, retry_s: float = 5.0, busy_timeout_s: float = 0.25,
                 metrics=None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.retention_days = retention_days
        self.max_queue, self.retry_s = int(max_queue), float(retry_s)
        self.metrics = metrics
        self._queue: queue.Queue = queue.Queue()
        self._queued_rows = 0
        self._count_lock = threading.Lock()
        self._db_lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=busy_timeout_s)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(SCHEMA)
        self._last_purge = 0.0
        self._purge()
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self.failures = self.dropped = self.written_rows = 0
        self.last_drop: float | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._writer, name="diffmem-audit", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- writing
    def prompts(self, endpoint: str, client: str | None, prompts, scores, threshold: float,
                detail: str | None = None) -> AuditTicket | None:
        """One row per scored prompt (hashes only); ``None`` when the queue is full (dropped)."""
        now = time.time()
        client = safe_client(client)
        detail = safe_detail(detail)
        rows = [AuditRow(now, client, endpoint, prompt_hash(p), float(s), float(threshold),
                         "flagged" if s > threshold else "clear", detail)
                for p, s in zip(prompts, scores, strict=True)]
        return self._put(rows)

    def rejection(self, endpoint: str, client: str | None, status: int,
                  kind: str) -> AuditTicket | None:
        """One row for a rejected request: the status and a fixed kind word, nothing it sent."""
        kind = kind if _KIND.fullmatch(kind or "") else "other"
        return self._put([AuditRow(time.time(), safe_client(client), endpoint, None, None, None,
                                   "rejected", f"{int(status)} {kind}")])

    @property
    def healthy(self) -> bool:
        """False when the writer died, rows have failed for over ``retry_s`` or the queue is
        nearly full."""
        return not self.problem()

    def problem(self) -> str | None:
        """Why the log is not healthy (``None`` when it is)."""
        if not self._thread.is_alive() and not self._closing:
            return "audit writer stopped"
        if self.failing_since is not None and time.monotonic() - self.failing_since > self.retry_s:
            return f"audit rows not written for {time.monotonic() - self.failing_since:.0f} s " \
                   f"({self.last_error})"
        if self.last_drop is not None and time.monotonic() - self.last_drop < self.retry_s:
            return "audit rows dropped: the audit queue was full"
        if self._queued_rows >= 0.9 * self.max_queue:
            return f"audit queue nearly full ({self._queued_rows} rows)"
        return None

    @property
    def queued(self) -> int:
        return self._queued_rows

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every row queued before the call is written (true when it was, within
        ``timeout``)."""
        if not self._thread.is_alive():  # closed: nothing is written any more
            return self._queued_rows == 0
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (retrying up to ``timeout``), then stop; rows still unwritten are
        counted as dropped and logged."""
        if not self._thread.is_alive():
            return
        self._closing = True
        self._close_deadline = time.monotonic() + timeout
        self._queue.put(None)
        self._thread.join(timeout=timeout + 5)
        if not self._thread.is_alive():
            self._conn.close()

    def rows(self) -> list[AuditRow]:
        """Every row, oldest first (for tests and inspection)."""
        self.flush()
        with self._db_lock:
            cur = self._conn.execute("SELECT time, client, endpoint, prompt_hash, score, threshold, "
                                     "decision, detail FROM audit ORDER BY id")
            return [AuditRow(*r) for r in cur.fetchall()]

    # ---------------------------------------------------------------- internals
    def _put(self, rows: list[AuditRow]) -> AuditTicket | None:
        with self._count_lock:
            if self._queued_rows + len(rows) > self.max_queue:
                full = True
            else:
                full = False
                self._queued_rows += len(rows)
        if full:
            self.dropped += len(rows)
            self.last_drop = time.monotonic()
            if self.metrics is not None:
                self.metrics.audit_dropped.inc(value=len(rows))
            log.error("audit queue full (%d rows): %d row(s) dropped", self.max_queue, len(rows))
            return None
        self._set_gauge()
        ticket = AuditTicket(rows)
        self._queue.put(ticket)
        return ticket

    def _set_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.audit_queue.set(self._queued_rows)

    def _writer(self) -> None:
        pending: list[AuditTicket] = []
        waiters: list[threading.Event] = []
        attempt = 0
        stop = False
        while True:
            try:
                if not pending and not stop:
                    items = [self._queue.get()]
                else:  # retrying: wait a little, taking new rows meanwhile
                    items = []
                    with contextlib.suppress(queue.Empty):
                        items.append(self._queue.get(timeout=min(1.0, 0.05 * 2 ** attempt)))
                while True:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                for it in items:
                    if isinstance(it, AuditTicket):
                        pending.append(it)
                    elif isinstance(it, threading.Event):
                        waiters.append(it)
                    elif it is None:
                        stop = True
                if pending:
                    if self._write(pending):
                        pending, attempt = [], 0
                    else:
                        attempt += 1
                if not pending:
                    if time.time() - self._last_purge > PURGE_EVERY_S:
                        self._purge()
                    for w in waiters:
                        w.set()
                    waiters = []
                if stop and (not pending or time.monotonic() > self._close_deadline):
                    if pending:
                        n = sum(len(t.rows) for t in pending)
                        self.dropped += n
                        log.error("audit log closed with %d row(s) not written: %s", n,
                                  self.last_error)
                    for w in waiters:
                        w.set()
                    return
            except Exception:  # never die: report and go on
                log.exception("audit writer error")
                self._failed("other", "writer error")
                time.sleep(0.1)

    def _write(self, pending: list[AuditTicket]) -> bool:
        """Write the rows of every still-pending ticket in one transaction."""
        claimed = [t for t in pending if t._claim()]
        n_dropped = sum(len(t.rows) for t in pending if t.state == "withdrawn")
        rows = [r for t in claimed for r in t.rows]
        try:
            if rows:
                with self._db_lock, self._conn:
                    self._conn.executemany(
                        "INSERT INTO audit (time, client, endpoint, prompt_hash, score, "
                        "threshold, decision, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [(r.time, r.client, r.endpoint, r.prompt_hash, r.score, r.threshold,
                          r.decision, r.detail) for r in rows])
        except (sqlite3.Error, OSError) as e:
            for t in claimed:
                t._settle(False)
            self._failed(failure_kind(e), f"{type(e).__name__}: {e}")
            return False
        for t in claimed:
            t._settle(True)
        with self._count_lock:
            self._queued_rows -= len(rows) + n_dropped
        self._set_gauge()
        self.written_rows += len(rows)
        if self.failing_since is not None:
            log.warning("audit log writable again after %.1f s; %d row(s) written",
                        time.monotonic() - self.failing_since, len(rows))
        self.failing_since, self.last_error = None, None
        return True

    def _failed(self, kind: str, error: str) -> None:
        self.failures += 1
        self.last_error = error
        if self.failing_since is None:
            self.failing_since = time.monotonic()
        if self.metrics is not None:
            self.metrics.audit_failures.inc(kind)
        log.error("audit write failed (%s): %s; rows kept and retried", kind, error)

    def _purge(self) -> None:
        self._last_purge = time.time()
        if self.retention_days is None:
            return
        cutoff = time.time() - self.retention_days * 86400.0
        try:
            with self._db_lock, self._conn:
                self._conn.execute("DELETE FROM audit WHERE time < ?", (cutoff,))
        except sqlite3.Error as e:  # retried at the next purge
            self._last_purge = time.time() - PURGE_EVERY_S + 60
            log.warning("audit purge failed: %s", e)

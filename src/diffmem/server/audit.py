"""Audit log of the guard service in SQLite: one row per scored prompt or rejected request.

A row holds the time (Unix seconds), the client address, the endpoint, the SHA-256 of the prompt
(never the prompt itself), the score, the threshold and the decision (``flagged`` / ``clear`` /
``rejected``). A rejected request is logged once, as the rejection (status and reason), without
its prompts. Rows older than ``retention_days`` are deleted when the log opens and then hourly.

Writes go through one background thread (the event loop never waits for the disk); :meth:`flush`
waits until everything queued is written.
"""

from __future__ import annotations

import hashlib
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

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


def prompt_hash(prompt: str) -> str:
    """SHA-256 (hex) of the prompt's UTF-8 bytes."""
    return hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()


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


class AuditLog:
    """SQLite audit log written by a background thread."""

    def __init__(self, path: str | Path, *, retention_days: float | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.retention_days = retention_days
        self._queue: queue.Queue = queue.Queue()
        self._db_lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(SCHEMA)
        self._last_purge = 0.0
        self._purge()
        self._thread = threading.Thread(target=self._writer, name="diffmem-audit", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- writing
    def prompts(self, endpoint: str, client: str | None, prompts, scores, threshold: float,
                detail: str | None = None) -> None:
        """One row per scored prompt."""
        now = time.time()
        for p, s in zip(prompts, scores, strict=True):
            self._queue.put(AuditRow(now, client, endpoint, prompt_hash(p), float(s),
                                     float(threshold), "flagged" if s > threshold else "clear",
                                     detail))

    def rejection(self, endpoint: str, client: str | None, status: int, reason: str) -> None:
        """One row for a rejected request: no prompt, only the status and the reason."""
        self._queue.put(AuditRow(time.time(), client, endpoint, None, None, None, "rejected",
                                 f"{status}: {reason}"))

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every queued row is written."""
        if not self._thread.is_alive():  # closed: nothing is written any more
            return
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self.flush()
        self._queue.put(None)
        self._thread.join(timeout=10)
        self._conn.close()

    def rows(self) -> list[AuditRow]:
        """Every row, oldest first (for tests and inspection)."""
        self.flush()
        with self._lock():
            cur = self._conn.execute("SELECT time, client, endpoint, prompt_hash, score, threshold, "
                                     "decision, detail FROM audit ORDER BY id")
            return [AuditRow(*r) for r in cur.fetchall()]

    # ---------------------------------------------------------------- internals
    def _lock(self) -> threading.Lock:
        return self._db_lock

    def _writer(self) -> None:
        while True:
            item = self._queue.get()
            batch = [item]
            while True:  # write everything already queued in one transaction
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            rows = [r for r in batch if isinstance(r, AuditRow)]
            if rows:
                with self._lock(), self._conn:
                    self._conn.executemany(
                        "INSERT INTO audit (time, client, endpoint, prompt_hash, score, threshold, "
                        "decision, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [(r.time, r.client, r.endpoint, r.prompt_hash, r.score, r.threshold,
                          r.decision, r.detail) for r in rows])
            if time.time() - self._last_purge > PURGE_EVERY_S:
                self._purge()
            for r in batch:
                if isinstance(r, threading.Event):
                    r.set()
            if any(r is None for r in batch):
                return

    def _purge(self) -> None:
        self._last_purge = time.time()
        if self.retention_days is None:
            return
        cutoff = time.time() - self.retention_days * 86400.0
        with self._lock(), self._conn:
            self._conn.execute("DELETE FROM audit WHERE time < ?", (cutoff,))

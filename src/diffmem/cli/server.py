"""``diffmem serve``: parsing only; the app is :func:`diffmem.server.app.create_app`.

    diffmem serve [--model PATH|testbed] [--host 127.0.0.1] [--port 8000] [--threshold X]
                  [--index DIR] [--api-key-file FILE] [--audit-db FILE] [--audit-retention-days N]
                  [--audit-fail-closed] [--allowed-hosts H,..] [--forwarded-allow-ips IPS]
                  [limits, admission and shutdown options...]

SIGTERM: uvicorn stops accepting connections, in-flight requests get ``--shutdown-timeout``
seconds to finish, then their work is cancelled; the command exits 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from diffmem.cli._index import add_index_options, command_index
from diffmem.cli.args import add_model
from diffmem.runtime.errors import ConfigError


def _read_key(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(f"cannot read the API key file {path}: {e.strerror}") from None
    if not key or len(key.splitlines()) != 1:
        raise ConfigError(f"the API key file {path} must hold one non-empty line")
    return key


def _hosts(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(h.strip() for h in value.split(",") if h.strip())


def cmd_serve(a: argparse.Namespace) -> int:
    import uvicorn

    from diffmem.server import build_engine
    from diffmem.server.app import ServerConfig, create_app, uvicorn_options
    from diffmem.server.audit import AuditLog
    from diffmem.server.config import is_loopback

    key = _read_key(a.api_key_file)
    if a.audit_retention_days is not None and a.audit_retention_days <= 0:
        raise ConfigError("--audit-retention-days must be > 0")
    if a.audit_fail_closed and not a.audit_db:
        raise ConfigError("--audit-fail-closed needs --audit-db")
    cfg = ServerConfig(max_prompts=a.max_prompts, max_tokens=a.max_tokens,
                       max_body_bytes=a.max_body_bytes, timeout_s=a.timeout,
                       max_batch=a.max_batch, max_wait_ms=a.batch_wait_ms, max_steps=a.max_steps,
                       workers=a.workers, max_queue=a.max_queue, max_queue_wait_s=a.max_queue_wait,
                       max_pending=a.max_pending, max_in_flight=a.max_in_flight,
                       max_connections=a.max_connections, shutdown_timeout_s=a.shutdown_timeout,
                       audit_fail_closed=a.audit_fail_closed, api_key=key, host=a.host,
                       allowed_hosts=_hosts(a.allowed_hosts),
                       forwarded_allow_ips=a.forwarded_allow_ips, model_name=str(a.model))
    if not is_loopback(a.host) and key is None:
        print(f"diffmem: warning: serving on {a.host}, beyond loopback, without an API key: "
              "anyone who can reach the port can use the model (--api-key-file FILE)",
              file=sys.stderr, flush=True)
    print(f"loading {a.model} ...", file=sys.stderr, flush=True)
    # --index, else the index `diffmem calibrate --index` stored (one line says so)
    choice, model = command_index(a, a.model, scheduler=a.scheduler)
    engine = build_engine(model, threshold=a.threshold, index=choice.index,
                          max_batch=a.max_batch, scheduler=a.scheduler)
    audit = AuditLog(a.audit_db, retention_days=a.audit_retention_days,
                     retry_s=a.audit_retry) if a.audit_db else None
    app = create_app(engine, cfg, audit=audit)
    cfg = app.state.guard.config
    where = {"stored": " (stored by `diffmem calibrate --index`)", "off": " (--no-index)"}
    print(f"threshold {engine.threshold:.4f}; index: {choice.index or 'none'}"
          f"{where.get(choice.origin, '')}; auth: "
          f"{'API key' if key else 'none'}; audit: {a.audit_db or 'off'}"
          f"{' (fail closed)' if a.audit_fail_closed else ''}; hosts: "
          f"{','.join(cfg.allowed_hosts)}; proxies trusted: {a.forwarded_allow_ips or 'none'}",
          file=sys.stderr)
    print(f"serving on http://{a.host}:{a.port}/ (page), /docs (API)", file=sys.stderr, flush=True)
    if threading.current_thread() is threading.main_thread():
        # uvicorn shuts down gracefully on SIGTERM, then re-raises it with the handler found
        # here: a no-op, so a requested shutdown exits 0
        signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, **uvicorn_options(cfg))
    finally:
        if audit is not None:
            audit.close()
    return 0


def register(commands, eval_commands) -> None:
    """Add ``serve``."""
    s = commands.add_parser("serve", help="HTTP guard service and page: detect, explain, "
                                          "generate with mitigation")
    add_model(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--threshold", type=float, default=None,
                   help="first-step noise-magnitude threshold (default: calibrated at 1%% FPR on "
                        "the testbed's held-out prompts, or stored by `diffmem calibrate`)")
    add_index_options(s, "training index folder (diffmem index build): verdicts by generation "
                         "(previews searched in it), the nearest training image of generations, "
                         "amg; without it the verdict is the first-step estimate")
    s.add_argument("--scheduler", default=None, help="ddim, dpm, euler, ... (default: the model's)")
    s.add_argument("--api-key-file", default=None,
                   help="file holding the API key that /v1 requests must send")
    s.add_argument("--audit-db", default=None, help="SQLite audit log file (default: no log)")
    s.add_argument("--audit-retention-days", type=float, default=None,
                   help="delete audit rows older than this (default: keep all)")
    s.add_argument("--audit-fail-closed", action="store_true",
                   help="refuse /v1 requests (503) while the audit log cannot be written, and "
                        "send no answer before its rows are written (default: keep serving, "
                        "keep the rows queued and retry)")
    s.add_argument("--audit-retry", type=float, default=5.0,
                   help="seconds audit writes may keep failing (database locked, disk full) "
                        "before readiness fails and fail-closed requests are refused")
    s.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host header names accepted ('*': any; default: "
                        "localhost,127.0.0.1,[::1] when bound to loopback, else any)")
    s.add_argument("--forwarded-allow-ips", default=None,
                   help="comma-separated proxy addresses whose X-Forwarded-For is trusted for "
                        "the client address (default: none; the socket's peer is the client)")
    s.add_argument("--max-prompts", type=int, default=32, help="prompts per /v1/detect request")
    s.add_argument("--max-tokens", type=int, default=None,
                   help="prompt tokens per prompt (default: the text encoder's context; larger "
                        "values accept longer prompts, truncated and reported)")
    s.add_argument("--max-body-bytes", type=int, default=65536, help="largest request body (413 above)")
    s.add_argument("--timeout", type=float, default=60.0,
                   help="per-request compute limit in seconds (504 past it; the work is "
                        "cancelled)")
    s.add_argument("--max-batch", type=int, default=16, help="prompts per micro-batch")
    s.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a queued prompt waits for others to share its batch")
    s.add_argument("--max-steps", type=int, default=50, help="denoising steps of /v1/generate")
    s.add_argument("--workers", type=int, default=2, help="threads for explain and generate")
    s.add_argument("--max-queue", type=int, default=512,
                   help="detect prompts waiting for a micro-batch before 503 (default 512: about "
                        "11 s of work at the measured 45 prompts/s)")
    s.add_argument("--max-queue-wait", type=float, default=None,
                   help="refuse (503) work that would wait longer than this many seconds by the "
                        "measured throughput (default: half of --timeout)")
    s.add_argument("--max-pending", type=int, default=4,
                   help="explain / generate jobs waiting for a worker before 503")
    s.add_argument("--max-in-flight", type=int, default=128,
                   help="requests served at once before 503 (Retry-After)")
    s.add_argument("--max-connections", type=int, default=256,
                   help="open connections (uvicorn answers a bare 503 beyond)")
    s.add_argument("--shutdown-timeout", type=float, default=20.0,
                   help="on SIGTERM, seconds in-flight requests may finish before their work is "
                        "cancelled")
    s.add_argument("--log-level", default="info", help="uvicorn's log level")
    s.set_defaults(func=cmd_serve)

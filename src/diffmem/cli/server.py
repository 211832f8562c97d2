"""``diffmem serve``: parsing only; the app is :func:`diffmem.server.app.create_app`.

    diffmem serve [--model PATH|testbed] [--host 127.0.0.1] [--port 8000] [--threshold X]
                  [--index DIR] [--api-key-file FILE] [--audit-db FILE] [--audit-retention-days N]
                  [limits...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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


def cmd_serve(a: argparse.Namespace) -> int:
    import uvicorn

    from diffmem.server import build_engine
    from diffmem.server.app import ServerConfig, create_app
    from diffmem.server.audit import AuditLog

    key = _read_key(a.api_key_file)
    if a.audit_retention_days is not None and a.audit_retention_days <= 0:
        raise ConfigError("--audit-retention-days must be > 0")
    cfg = ServerConfig(max_prompts=a.max_prompts, max_tokens=a.max_tokens,
                       max_body_bytes=a.max_body_bytes, timeout_s=a.timeout,
                       max_batch=a.max_batch, max_wait_ms=a.batch_wait_ms, max_steps=a.max_steps,
                       workers=a.workers, api_key=key, model_name=str(a.model))
    print(f"loading {a.model} ...", file=sys.stderr, flush=True)
    engine = build_engine(a.model, threshold=a.threshold, index=a.index, max_batch=a.max_batch,
                          scheduler=a.scheduler)
    audit = AuditLog(a.audit_db, retention_days=a.audit_retention_days) if a.audit_db else None
    app = create_app(engine, cfg, audit=audit)
    print(f"threshold {engine.threshold:.4f}; index: {a.index or 'none'}; auth: "
          f"{'API key' if key else 'none'}; audit: {a.audit_db or 'off'}", file=sys.stderr)
    print(f"serving on http://{a.host}:{a.port}/ (page), /docs (API)", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level)
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
    s.add_argument("--index", default=None,
                   help="training index folder (diffmem index build) for the nearest training "
                        "image of generations, and for amg; without it, no nearest image")
    s.add_argument("--scheduler", default=None, help="ddim, dpm, euler, ... (default: the model's)")
    s.add_argument("--api-key-file", default=None,
                   help="file holding the API key that /v1 requests must send")
    s.add_argument("--audit-db", default=None, help="SQLite audit log file (default: no log)")
    s.add_argument("--audit-retention-days", type=float, default=None,
                   help="delete audit rows older than this (default: keep all)")
    s.add_argument("--max-prompts", type=int, default=32, help="prompts per /v1/detect request")
    s.add_argument("--max-tokens", type=int, default=None,
                   help="prompt tokens per prompt (default: the text encoder's context; larger "
                        "values accept longer prompts, truncated and reported)")
    s.add_argument("--max-body-bytes", type=int, default=65536, help="largest request body (413 above)")
    s.add_argument("--timeout", type=float, default=60.0, help="per-request limit in seconds")
    s.add_argument("--max-batch", type=int, default=16, help="prompts per micro-batch")
    s.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a queued prompt waits for others to share its batch")
    s.add_argument("--max-steps", type=int, default=50, help="denoising steps of /v1/generate")
    s.add_argument("--workers", type=int, default=2, help="threads for explain and generate")
    s.add_argument("--log-level", default="info", help="uvicorn's log level")
    s.set_defaults(func=cmd_serve)

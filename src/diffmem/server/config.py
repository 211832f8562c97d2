"""The service's limits (:class:`ServerConfig`, frozen) and its shared state (:class:`AppState`).

:func:`resolve_config` derives what a config leaves open (the token limit, the model's name) from
the loaded engine and checks the limits, once, before the app is built; nothing changes a config
afterwards.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from diffmem.runtime.errors import DiffmemError
from diffmem.server.audit import AuditLog
from diffmem.server.batching import MicroBatcher
from diffmem.server.engine import Engine
from diffmem.server.metrics import Metrics

_AT_LEAST_ONE = ("max_prompts", "max_tokens", "max_prompt_chars", "max_body_bytes", "max_batch",
                 "max_queue", "max_steps", "workers", "max_in_flight", "max_connections")

#: Host names a server bound to a loopback address answers to (any port): DNS rebinding guard
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")
LOOPBACK_BINDS = ("127.0.0.1", "localhost", "::1", "[::1]")


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a bind address) is a loopback address."""
    if host is None:
        return False
    if host in LOOPBACK_BINDS:
        return True
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerConfig:
    """Limits and options of the service (``diffmem serve`` flags of the same names).

    Attributes:
        max_prompts: prompts per ``/v1/detect`` request.
        max_tokens: prompt tokens per prompt (BOS/EOS not counted); default the text encoder's
            context. A larger value accepts longer prompts, truncated to the context and reported
            with ``truncated: true`` (as the CLI warns).
        max_prompt_chars: characters per prompt.
        max_body_bytes: request body size.
        timeout_s: per-request compute limit; past it the request gets 504 and its work is
            cancelled (dropped from the queue, or stopped at its next UNet call).
        max_batch: prompts per micro-batched UNet call; max_wait_ms: how long the first queued
            prompt waits for others.
        max_queue: prompts waiting for a batch before new detect requests get 503.
        max_queue_wait_s: detect requests whose prompts would wait longer than this (estimated
            from the measured seconds per prompt) get 503; default half of ``timeout_s``.
        max_steps: denoising steps ``/v1/generate`` may ask for.
        workers: threads for explain / generate (detection has its own).
        max_pending: explain / generate jobs waiting for a worker before new ones get 503.
        max_in_flight: HTTP requests served at once before new ones get 503.
        max_connections: open connections uvicorn accepts (its own bare 503 beyond).
        shutdown_timeout_s: on SIGTERM, how long in-flight requests may finish before their work
            is cancelled.
        audit_fail_closed: refuse requests (503) while the audit log cannot be written, and answer
            no 200 before the request's rows are written.
        api_key: required in ``Authorization: Bearer KEY`` or ``X-API-Key`` on ``/v1`` routes.
        host: the address the server is bound to (sets the default ``allowed_hosts``).
        allowed_hosts: ``Host`` header names accepted (any port); default: the loopback names
            when ``host`` is a loopback address, else any. ``("*",)``: any.
        forwarded_allow_ips: proxies whose ``X-Forwarded-For`` / ``-Proto`` headers are trusted
            (uvicorn's option); default none: the socket's address is the client.
        model_name: shown by ``/healthz`` (default: the folder the model was loaded from).
    """

    max_prompts: int = 32
    max_tokens: int | None = None
    max_prompt_chars: int = 2000
    max_body_bytes: int = 65536
    timeout_s: float = 60.0
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 512
    max_queue_wait_s: float | None = None
    max_steps: int = 50
    workers: int = 2
    max_pending: int = 4
    max_in_flight: int = 128
    max_connections: int = 256
    shutdown_timeout_s: float = 20.0
    audit_fail_closed: bool = False
    api_key: str | None = None
    host: str | None = None
    allowed_hosts: tuple[str, ...] | None = None
    forwarded_allow_ips: str | None = None
    model_name: str | None = None


def resolve_config(config: ServerConfig | None, engine: Engine) -> ServerConfig:
    """``config`` (default :class:`ServerConfig`) with its open fields taken from ``engine``,
    checked; raises :class:`DiffmemError` on a limit below 1, a timeout <= 0 or a negative wait."""
    cfg = config or ServerConfig()
    cfg = replace(cfg, max_tokens=engine.context_tokens if cfg.max_tokens is None else cfg.max_tokens,
                  model_name=_model_name(engine) if cfg.model_name is None else cfg.model_name,
                  max_queue_wait_s=cfg.timeout_s / 2 if cfg.max_queue_wait_s is None
                  else cfg.max_queue_wait_s,
                  allowed_hosts=_allowed_hosts(cfg))
    _check_limits(cfg)
    return cfg


def _model_name(engine: Engine) -> str:
    """The name of a shipped model (``testbed``, ``testbed-graded``), else the folder it was loaded
    from, else the pipeline's class name."""
    from diffmem.models.profile import MODELS

    path = engine.adapter.path
    if path is None:
        return type(engine.adapter.pipe).__name__
    names = {MODELS.get(n).resolve(): n.replace("_", "-") for n in MODELS}
    return names.get(Path(path).resolve(), str(path))


def _allowed_hosts(cfg: ServerConfig) -> tuple[str, ...]:
    if cfg.allowed_hosts is not None:
        return tuple(h.lower() for h in cfg.allowed_hosts)
    return LOOPBACK_HOSTS if is_loopback(cfg.host) else ("*",)


def _check_limits(cfg: ServerConfig) -> None:
    for name in _AT_LEAST_ONE:
        if int(getattr(cfg, name)) < 1:
            raise DiffmemError(f"{name} must be >= 1")
    if cfg.timeout_s <= 0 or cfg.max_wait_ms < 0:
        raise DiffmemError("timeout must be > 0 and the batch wait >= 0")
    if cfg.max_pending < 0 or cfg.max_queue_wait_s <= 0 or cfg.shutdown_timeout_s < 0:
        raise DiffmemError("max_pending and shutdown_timeout_s must be >= 0, max_queue_wait_s > 0")
    if not cfg.allowed_hosts:
        raise DiffmemError("allowed_hosts must name at least one host (or '*')")


@dataclass
class AppState:
    """What the middleware and the routes share: the engine, the resolved config, the metrics, the
    audit log, and the batcher and worker threads (made when the app starts)."""

    engine: Engine
    config: ServerConfig
    metrics: Metrics
    audit: AuditLog | None
    batcher: MicroBatcher | None = None
    #: the verdicts by generation (previews searched in the index), batched across requests;
    #: None without an index
    previews: MicroBatcher | None = None
    workers: ThreadPoolExecutor | None = None
    #: explain / generate jobs admitted and not finished, and the cancel events of running work
    jobs: int = 0
    cancels: set = field(default_factory=set)
    #: seconds one explain / generate job took (moving average; sizes Retry-After)
    job_seconds: float = 1.0
    in_flight: int = 0
    shutting_down: bool = False

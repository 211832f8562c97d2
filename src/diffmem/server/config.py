"""The service's limits (:class:`ServerConfig`, frozen) and its shared state (:class:`AppState`).

:func:`resolve_config` derives what a config leaves open (the token limit, the model's name) from
the loaded engine and checks the limits, once, before the app is built; nothing changes a config
afterwards.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from diffmem.runtime.errors import DiffmemError
from diffmem.server.audit import AuditLog
from diffmem.server.batching import MicroBatcher
from diffmem.server.engine import Engine
from diffmem.server.metrics import Metrics

_AT_LEAST_ONE = ("max_prompts", "max_tokens", "max_prompt_chars", "max_body_bytes", "max_batch",
                 "max_queue", "max_steps", "workers")


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
        timeout_s: per-request limit; a request past it gets 408 and its work is dropped.
        max_batch: prompts per micro-batched UNet call; max_wait_ms: how long the first queued
            prompt waits for others.
        max_queue: prompts waiting for a batch before new requests get 429.
        max_steps: denoising steps ``/v1/generate`` may ask for.
        workers: threads for explain / generate (detection has its own).
        api_key: required in ``Authorization: Bearer KEY`` or ``X-API-Key`` on ``/v1`` routes.
        model_name: shown by ``/healthz`` (default: the folder the model was loaded from).
    """

    max_prompts: int = 32
    max_tokens: int | None = None
    max_prompt_chars: int = 2000
    max_body_bytes: int = 65536
    timeout_s: float = 60.0
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 4096
    max_steps: int = 50
    workers: int = 2
    api_key: str | None = None
    model_name: str | None = None


def resolve_config(config: ServerConfig | None, engine: Engine) -> ServerConfig:
    """``config`` (default :class:`ServerConfig`) with its open fields taken from ``engine``,
    checked; raises :class:`DiffmemError` on a limit below 1, a timeout <= 0 or a negative wait."""
    cfg = config or ServerConfig()
    cfg = replace(cfg, max_tokens=engine.context_tokens if cfg.max_tokens is None else cfg.max_tokens,
                  model_name=_model_name(engine) if cfg.model_name is None else cfg.model_name)
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


def _check_limits(cfg: ServerConfig) -> None:
    for name in _AT_LEAST_ONE:
        if int(getattr(cfg, name)) < 1:
            raise DiffmemError(f"{name} must be >= 1")
    if cfg.timeout_s <= 0 or cfg.max_wait_ms < 0:
        raise DiffmemError("timeout must be > 0 and the batch wait >= 0")


@dataclass
class AppState:
    """What the middleware and the routes share: the engine, the resolved config, the metrics, the
    audit log, and the batcher and worker threads (made when the app starts)."""

    engine: Engine
    config: ServerConfig
    metrics: Metrics
    audit: AuditLog | None
    batcher: MicroBatcher | None = None
    workers: ThreadPoolExecutor | None = None

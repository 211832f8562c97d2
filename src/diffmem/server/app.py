"""The guard service: FastAPI app with micro-batched detection, explanations, generation and a page.

Routes: ``POST /v1/detect``, ``POST /v1/explain``, ``POST /v1/generate``, ``GET /livez``,
``GET /readyz``, ``GET /healthz``, ``GET /metrics`` (Prometheus text), ``GET /`` (the page),
``/openapi.json`` and ``/docs``. Every rejection is a 4xx/5xx with
``{"error": "<one-line reason>"}``; the audit log keeps its status and kind only. Model work runs
in worker threads (:mod:`diffmem.server.engine`), never on the event loop.

:func:`create_app` only wires the parts: the config and shared state
(:mod:`diffmem.server.config`), the bodies (:mod:`diffmem.server.schemas`), the middleware
(:mod:`diffmem.server.middleware`), the error handlers (:mod:`diffmem.server.errors`) and the
routes (:mod:`diffmem.server.routes`).
"""

import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

from diffmem.runtime.version import __version__
from diffmem.server.audit import AuditLog
from diffmem.server.batching import MicroBatcher
from diffmem.server.config import AppState, ServerConfig, resolve_config
from diffmem.server.endpoints import ENDPOINTS
from diffmem.server.engine import Engine
from diffmem.server.errors import ApiError, add_error_handlers
from diffmem.server.metrics import Metrics
from diffmem.server.middleware import GuardMiddleware
from diffmem.server.routes import add_ops_routes, add_v1_routes
from diffmem.server.schemas import ErrorResponse

log = logging.getLogger("diffmem.server")

__all__ = ["ENDPOINTS", "ApiError", "AppState", "GuardMiddleware", "ServerConfig", "create_app",
           "uvicorn_options"]

_DESCRIPTION = ("Memorization checks for a text-to-image model: with the training index, the "
                "verdict comes from generated previews searched in it (preview replication); "
                "the first-step noise magnitude (Wen et al., ICLR 2024) against a calibrated "
                "threshold is the fast estimate. Word attributions "
                "and edits, and mitigated generation. Errors: a 4xx with "
                "{\"error\": \"<one-line reason>\"}.")


def create_app(engine: Engine, config: ServerConfig | None = None, *,
               audit: AuditLog | None = None) -> FastAPI:
    """The service around one :class:`Engine` (one loaded model)."""
    state = AppState(engine, resolve_config(config, engine), Metrics(), audit)
    _build_info(state.metrics)
    if audit is not None:
        audit.metrics = state.metrics
    app = _fastapi(lifespan=_lifespan(state))
    app.state.guard = state
    app.add_middleware(GuardMiddleware, state=state)
    add_error_handlers(app)
    add_v1_routes(app, state)
    add_ops_routes(app, state)
    return app


def _build_info(metrics: Metrics) -> None:
    import platform

    import torch

    metrics.build_info.set(1, __version__, platform.python_version(), torch.__version__)


def uvicorn_options(cfg: ServerConfig) -> dict:
    """uvicorn's options for ``cfg``: proxy headers trusted only from ``forwarded_allow_ips``,
    the connection limit and the graceful-shutdown window."""
    return {"proxy_headers": cfg.forwarded_allow_ips is not None,
            "forwarded_allow_ips": cfg.forwarded_allow_ips or "",
            "limit_concurrency": cfg.max_connections,
            "timeout_graceful_shutdown": cfg.shutdown_timeout_s,
            "server_header": False}


def _lifespan(state: AppState):
    """Start: the worker pool and the micro-batcher (on its own thread). Stop (after uvicorn's
    graceful window, when in-flight requests finished or were cancelled): every running job's
    cancel event set (it stops at its next UNet call), the batcher, the pool (queued work
    cancelled), the batch thread and a flush of the audit log."""
    cfg = state.config

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.shutting_down = False
        state.workers = ThreadPoolExecutor(cfg.workers, thread_name_prefix="diffmem-work")
        batch_thread = ThreadPoolExecutor(1, thread_name_prefix="diffmem-batch")
        state.batcher = MicroBatcher(state.engine.score, batch_thread, max_batch=cfg.max_batch,
                                     max_wait_s=cfg.max_wait_ms / 1000, max_queue=cfg.max_queue,
                                     max_wait_queue_s=cfg.max_queue_wait_s,
                                     metrics=state.metrics)
        state.batcher.start()
        preview_thread = None
        if state.engine.judge is not None:  # 4 previews per prompt: a quarter of the rows
            preview_thread = ThreadPoolExecutor(1, thread_name_prefix="diffmem-preview")
            state.previews = MicroBatcher(state.engine.verdicts, preview_thread,
                                          max_batch=max(1, cfg.max_batch // 4),
                                          max_wait_s=cfg.max_wait_ms / 1000,
                                          max_queue=cfg.max_queue,
                                          max_wait_queue_s=cfg.max_queue_wait_s,
                                          convert=lambda v: v)
            state.previews.start()
        try:
            yield
        finally:
            state.shutting_down = True
            for cancel in list(state.cancels):
                cancel.set()
            await state.batcher.stop()
            if state.previews is not None:
                await state.previews.stop()
                preview_thread.shutdown(wait=False, cancel_futures=True)
            state.workers.shutdown(wait=False, cancel_futures=True)
            batch_thread.shutdown(wait=False, cancel_futures=True)
            if state.audit is not None and not state.audit.flush(timeout=5.0):
                log.error("audit log: %d row(s) not yet written at shutdown", state.audit.queued)

    return lifespan


def _fastapi(lifespan) -> FastAPI:
    """The bare app: title, version, description and the error body of every 4xx in the schema."""
    try:  # Swagger UI and ReDoc served from the package, not a CDN (works offline)
        from fastapi_offline import FastAPIOffline as make_app
    except ImportError:
        make_app = FastAPI
    return make_app(
        title="diffmem guard", version=__version__, lifespan=lifespan, description=_DESCRIPTION,
        responses={k: {"model": ErrorResponse} for k in (400, 401, 413, 422, 503, 504)})

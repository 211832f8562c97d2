"""The guard service: FastAPI app with micro-batched detection, explanations, generation and a page.

Routes: ``POST /v1/detect``, ``POST /v1/explain``, ``POST /v1/generate``, ``GET /healthz``,
``GET /metrics`` (Prometheus text), ``GET /`` (the page), ``/openapi.json`` and ``/docs``.
Every rejection is a 4xx with ``{"error": "<one-line reason>"}``; the reason of a rejected ``/v1``
request is also the only thing the audit log keeps of it. Model work runs in worker threads
(:mod:`diffmem.server.engine`), never on the event loop.

:func:`create_app` only wires the parts: the config and shared state
(:mod:`diffmem.server.config`), the bodies (:mod:`diffmem.server.schemas`), the middleware
(:mod:`diffmem.server.middleware`), the error handlers (:mod:`diffmem.server.errors`) and the
routes (:mod:`diffmem.server.routes`).
"""

from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

from diffmem.runtime.version import __version__
from diffmem.server.audit import AuditLog
from diffmem.server.batching import MicroBatcher
from diffmem.server.config import AppState, ServerConfig, resolve_config
from diffmem.server.engine import Engine
from diffmem.server.errors import ApiError, add_error_handlers
from diffmem.server.metrics import Metrics
from diffmem.server.middleware import ENDPOINTS, GuardMiddleware
from diffmem.server.routes import add_ops_routes, add_v1_routes
from diffmem.server.schemas import ErrorResponse

__all__ = ["ENDPOINTS", "ApiError", "AppState", "GuardMiddleware", "ServerConfig", "create_app"]

_DESCRIPTION = ("Memorization checks for a text-to-image model: first-step noise magnitude "
                "(Wen et al., ICLR 2024) against a calibrated threshold, word attributions "
                "and edits, and mitigated generation. Errors: a 4xx with "
                "{\"error\": \"<one-line reason>\"}.")


def create_app(engine: Engine, config: ServerConfig | None = None, *,
               audit: AuditLog | None = None) -> FastAPI:
    """The service around one :class:`Engine` (one loaded model)."""
    state = AppState(engine, resolve_config(config, engine), Metrics(), audit)
    batch_thread = ThreadPoolExecutor(1, thread_name_prefix="diffmem-batch")
    app = _fastapi(lifespan=_lifespan(state, batch_thread))
    app.state.guard = state
    app.add_middleware(GuardMiddleware, state=state)
    add_error_handlers(app)
    add_v1_routes(app, state)
    add_ops_routes(app, state)
    return app


def _lifespan(state: AppState, batch_thread: ThreadPoolExecutor):
    """Start: the worker pool and the micro-batcher (on ``batch_thread``). Stop: the batcher, the
    pool (queued work cancelled) and a flush of the audit log."""
    cfg = state.config

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.workers = ThreadPoolExecutor(cfg.workers, thread_name_prefix="diffmem-work")
        state.batcher = MicroBatcher(state.engine.score, batch_thread, max_batch=cfg.max_batch,
                                     max_wait_s=cfg.max_wait_ms / 1000, max_queue=cfg.max_queue,
                                     metrics=state.metrics)
        state.batcher.start()
        try:
            yield
        finally:
            await state.batcher.stop()
            state.workers.shutdown(wait=False, cancel_futures=True)
            if state.audit is not None:
                state.audit.flush()

    return lifespan


def _fastapi(lifespan) -> FastAPI:
    """The bare app: title, version, description and the error body of every 4xx in the schema."""
    try:  # Swagger UI and ReDoc served from the package, not a CDN (works offline)
        from fastapi_offline import FastAPIOffline as make_app
    except ImportError:
        make_app = FastAPI
    return make_app(
        title="diffmem guard", version=__version__, lifespan=lifespan, description=_DESCRIPTION,
        responses={k: {"model": ErrorResponse} for k in (400, 401, 408, 413, 422, 429)})

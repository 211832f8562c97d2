"""The routes, in two groups: the checks under ``/v1`` (:func:`add_v1_routes`) and the operator's
routes, ``/healthz``, ``/metrics`` and the page (:func:`add_ops_routes`).

Model work runs in worker threads (:mod:`diffmem.server.engine`), never on the event loop:
detection through the micro-batcher, explanations and generation in the app's worker pool, each
within the request's time limit.
"""

import asyncio
import threading
from dataclasses import asdict
from importlib import resources

from fastapi import FastAPI, Request, Security
from fastapi.responses import HTMLResponse, PlainTextResponse
from fastapi.security import APIKeyHeader

from diffmem.runtime.version import __version__
from diffmem.server.batching import QueueFull
from diffmem.server.config import AppState
from diffmem.server.engine import Cancelled
from diffmem.server.errors import ApiError
from diffmem.server.middleware import client_host
from diffmem.server.schemas import DetectResponse, ExplainResponse, GenerateResponse, request_models

# ------------------------------------------------------------------------------ steps of a request


def check_prompts(state: AppState, prompts: list[str]) -> list[int]:
    """The prompts' token counts; 422 when one is over the server's token limit."""
    engine, cfg = state.engine, state.config
    tokens = engine.count_tokens(prompts)
    for i, n in enumerate(tokens):
        if n > cfg.max_tokens:
            what = "the text encoder's context" if cfg.max_tokens == engine.context_tokens \
                else "the server's limit"
            raise ApiError(422, f"prompt {i} has {n} tokens, over the limit of "
                                f"{cfg.max_tokens} ({what})")
    return tokens


async def in_time(state: AppState, awaitable):
    """``awaitable``'s result, or 408 past the request's time limit."""
    timeout_s = state.config.timeout_s
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except TimeoutError:
        raise ApiError(408, f"the request took longer than the limit of {timeout_s:g} s; "
                            "nothing was returned") from None


async def in_worker(state: AppState, fn, *args, cancel: threading.Event | None = None, **kwargs):
    """``fn(*args, **kwargs)`` in a worker thread, within the time limit; ``cancel`` is set when
    the request is rejected (its time is up)."""
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(state.workers, lambda: fn(*args, **kwargs))
    try:
        return await in_time(state, fut)
    except ApiError:
        if cancel is not None:
            cancel.set()
        raise


# ------------------------------------------------------------------------------ /v1


def add_v1_routes(app: FastAPI, state: AppState) -> None:
    """``POST /v1/detect``, ``/v1/explain`` and ``/v1/generate``, with bodies limited by the
    server's config (and an API-key scheme in the OpenAPI schema when a key is required)."""
    from diffmem.mitigate import MITIGATIONS

    engine = state.engine
    DetectRequest, ExplainRequest, GenerateRequest = request_models(state.config, list(MITIGATIONS))
    security = [Security(APIKeyHeader(name="X-API-Key", auto_error=False))] \
        if state.config.api_key else []

    @app.post("/v1/detect", response_model=DetectResponse, dependencies=security,
              summary="Score prompts for memorization (micro-batched)")
    async def detect(req: DetectRequest, request: Request) -> dict:
        tokens = check_prompts(state, req.prompts)
        try:
            scores = await in_time(state, state.batcher.submit(req.prompts))
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}; retry later", {"Retry-After": "1"}) from None
        thr = engine.threshold
        results = [{"prompt": p, "score": s, "threshold": thr, "flagged": s > thr, "tokens": n,
                    "truncated": n > engine.context_tokens}
                   for p, s, n in zip(req.prompts, scores, tokens, strict=True)]
        for r in results:
            state.metrics.prompts.inc("flagged" if r["flagged"] else "clear")
        if state.audit is not None:
            state.audit.prompts("/v1/detect", client_host(request.scope), req.prompts, scores, thr)
        return {"threshold": thr, "results": results}

    @app.post("/v1/explain", response_model=ExplainResponse, dependencies=security,
              summary="Word attributions and suggested edits with their scores")
    async def explain(req: ExplainRequest, request: Request) -> dict:
        check_prompts(state, [req.prompt])
        out = await in_worker(state, engine.explain, req.prompt, top_k=req.top_k)
        if state.audit is not None:
            state.audit.prompts("/v1/explain", client_host(request.scope), [req.prompt],
                                [out["score"]], engine.threshold)
        return out

    @app.post("/v1/generate", response_model=GenerateResponse, dependencies=security,
              summary="Generate plain and mitigated images (base64 PNG)")
    async def generate(req: GenerateRequest, request: Request) -> dict:
        from diffmem.mitigate import parse_spec

        check_prompts(state, [req.prompt])
        parse_spec(req.mitigate)  # unknown method: ConfigError -> 422 before any work
        cancel = threading.Event()
        try:
            out = await in_worker(state, engine.generate, req.prompt, mitigate=req.mitigate,
                                  compare=req.compare, seed=req.seed, steps=req.steps,
                                  guidance_scale=req.guidance_scale, cancel=cancel)
        except Cancelled as e:
            raise ApiError(408, str(e)) from None
        if state.audit is not None:
            state.audit.prompts("/v1/generate", client_host(request.scope), [req.prompt],
                                [out["detection"]["score"]], engine.threshold,
                                detail=f"mitigate={req.mitigate}")
        return out


# ------------------------------------------------------------------------------ operator's routes


def add_ops_routes(app: FastAPI, state: AppState) -> None:
    """``GET /healthz`` (liveness, model, threshold, limits), ``GET /metrics`` (Prometheus text)
    and ``GET /`` (the page, read once here)."""
    from diffmem.mitigate import MITIGATIONS

    engine, cfg = state.engine, state.config
    mitigations = ["none", "auto", *MITIGATIONS]

    @app.get("/healthz", summary="Liveness, the model, the threshold and the limits")
    async def healthz() -> dict:
        return {"status": "ok", "version": __version__, "model": cfg.model_name,
                "threshold": engine.threshold, "index": engine.index is not None,
                "auth": cfg.api_key is not None, "mitigations": mitigations,
                "queued_prompts": state.batcher.queued if state.batcher else 0,
                "limits": {k: v for k, v in asdict(cfg).items()
                           if k not in ("api_key", "model_name")},
                "context_tokens": engine.context_tokens}

    @app.get("/metrics", response_class=PlainTextResponse,
             summary="Prometheus text format: requests, batch sizes, latencies")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    page = resources.files("diffmem.server").joinpath("static/index.html").read_text("utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index_page() -> HTMLResponse:
        return HTMLResponse(page)

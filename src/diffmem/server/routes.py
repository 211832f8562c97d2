"""The routes, in two groups: the checks under ``/v1`` (:func:`add_v1_routes`) and the operator's
routes, ``/livez``, ``/readyz``, ``/healthz``, ``/metrics`` and the page (:func:`add_ops_routes`).

Model work runs in worker threads (:mod:`diffmem.server.engine`), never on the event loop:
detection through the micro-batcher, explanations and generation in the app's worker pool. Every
piece of work goes through the same steps, so a new route (or a guard behind ``/v1/generate``)
reuses them:

- admission: :func:`admit_job` (explain / generate: at most ``workers + max_pending`` jobs) or the
  batcher's own queue limits (detect), 503 with ``Retry-After`` when full;
- :func:`await_work`: the result within ``timeout_s`` (504 past it), or 499 when the client
  disconnects; either way the work is cancelled (dropped from the queue, or stopped at its next
  UNet call through the job's cancel event); on shutdown the server cancels it too;
- :func:`audit_prompts`: the rows of the answer, waited for in fail-closed mode.
"""

import asyncio
import base64
import contextlib
import hashlib
import math
import threading
import time
from dataclasses import asdict
from importlib import resources

from fastapi import FastAPI, Request, Security
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import APIKeyHeader

from diffmem.runtime.version import __version__
from diffmem.server.batching import QueueFull
from diffmem.server.config import AppState
from diffmem.server.engine import Cancelled, verdict_fields
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
                                f"{cfg.max_tokens} ({what})", kind="too_many_tokens")
    return tokens


def busy(reason: str, retry_after: float, kind: str = "queue_full") -> ApiError:
    """503 with ``Retry-After`` (whole seconds, at least 1)."""
    return ApiError(503, f"server busy: {reason}; retry later",
                    {"Retry-After": str(max(1, math.ceil(retry_after)))}, kind=kind)


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body was read already; only a disconnect comes)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def await_work(state: AppState, request: Request, awaitable, *, endpoint: str,
                     cancel: threading.Event | None = None):
    """``awaitable``'s result within ``timeout_s``. Past it: 504; the client gone: 499; the
    request cancelled (server shutdown): re-raised. In each case ``awaitable`` is cancelled and
    ``cancel`` set, so the work stops (at its next UNet call)."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnected(request))
    reason = None
    try:
        done, _ = await asyncio.wait({work, gone}, timeout=state.config.timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            try:
                return work.result()
            except Cancelled:  # stopped by the server (shutdown) while running
                raise ApiError(503, "the work was cancelled: the server is shutting down",
                               {"Retry-After": "5"}, kind="shutting_down") from None
        reason = "disconnect" if gone in done else "timeout"
    except asyncio.CancelledError:
        reason = "shutdown"
        raise
    finally:
        gone.cancel()
        if reason is not None:
            if cancel is not None:
                cancel.set()
            work.cancel()
            state.metrics.cancelled.inc(endpoint, reason)
    if reason == "disconnect":
        raise ApiError(499, "the client closed the request; its work was cancelled",
                       kind="disconnected")
    raise ApiError(504, f"the work took longer than the limit of {state.config.timeout_s:g} s; "
                        "it was cancelled", kind="timeout")


def admit_job(state: AppState) -> None:
    """503 when ``workers + max_pending`` explain / generate jobs are admitted already, or when
    a new one would wait longer than ``max_queue_wait_s`` by the measured job time."""
    cfg = state.config
    waiting = max(0, state.jobs + 1 - cfg.workers)
    wait = state.job_seconds * waiting / cfg.workers
    if state.shutting_down:
        raise busy("the server is shutting down", 5, kind="shutting_down")
    if state.jobs >= cfg.workers + cfg.max_pending:
        raise busy(f"{state.jobs} explain / generate jobs running or waiting (limit "
                   f"{cfg.workers + cfg.max_pending})", wait)
    if waiting and wait > cfg.max_queue_wait_s:
        raise busy(f"explain / generate would wait about {wait:.0f} s (limit "
                   f"{cfg.max_queue_wait_s:g} s)", wait - cfg.max_queue_wait_s)


async def in_worker(state: AppState, request: Request, endpoint: str, fn, *args, **kwargs):
    """``fn(*args, cancel=event, **kwargs)`` in a worker thread, admitted by :func:`admit_job`
    and awaited by :func:`await_work` (which sets ``event`` when the request gives up)."""
    admit_job(state)
    loop = asyncio.get_running_loop()
    cancel = threading.Event()
    took = [None]

    def run():
        t0 = time.perf_counter()
        result = fn(*args, cancel=cancel, **kwargs)
        took[0] = time.perf_counter() - t0
        return result

    def finished(_) -> None:  # in the worker thread, or here when cancelled before it ran
        with contextlib.suppress(RuntimeError):  # the loop is closed (shutdown)
            loop.call_soon_threadsafe(_job_done, state, cancel, took[0])

    try:
        cf = state.workers.submit(run)
    except RuntimeError:  # the pool is shut down
        raise busy("the server is shutting down", 5, kind="shutting_down") from None
    state.jobs += 1
    state.cancels.add(cancel)
    state.metrics.work_queue.set(state.jobs)
    cf.add_done_callback(finished)
    return await await_work(state, request, asyncio.wrap_future(cf), endpoint=endpoint,
                            cancel=cancel)


def _job_done(state: AppState, cancel: threading.Event, took: float | None) -> None:
    state.jobs -= 1
    state.cancels.discard(cancel)
    state.metrics.work_queue.set(state.jobs)
    if took is not None and not cancel.is_set():
        state.job_seconds = 0.7 * state.job_seconds + 0.3 * took


async def audit_prompts(state: AppState, request: Request, endpoint: str, prompts, scores,
                        detail: str | None = None) -> None:
    """The rows of an answer (hashes, scores, decisions). In fail-closed mode the answer waits for
    them: rows not written within the audit's retry budget are withdrawn and the request gets
    503, so no 200 goes out without its rows."""
    audit = state.audit
    if audit is None:
        return
    ticket = audit.prompts(endpoint, client_host(request.scope), prompts, scores,
                           state.engine.threshold, detail=detail)
    if not state.config.audit_fail_closed:
        return
    deadline = time.monotonic() + audit.retry_s
    while ticket is not None:
        if await ticket.wait_async(max(0.05, deadline - time.monotonic())):
            return
        if time.monotonic() >= deadline and ticket.withdraw():
            break
    raise ApiError(503, "the audit log cannot be written; the answer was withheld",
                   {"Retry-After": "5"}, kind="audit_unavailable")


def mitigation_detail(spec: str) -> str:
    """``mitigate=ren:1.5,amg`` from the parsed spec (registry names and numbers only)."""
    from diffmem.mitigate import parse_spec

    parts = [n if s is None else f"{n}:{s:g}" for n, s in parse_spec(spec)]
    return "mitigate=" + ",".join(parts)


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
        by_generation = req.verdict == "generation" or (req.verdict == "auto"
                                                         and state.previews is not None)
        if by_generation and state.previews is None:
            raise ApiError(422, "verdict 'generation' needs the training index: start the "
                                "server with --index IDX", kind="no_index")
        try:
            state.batcher.admit(len(req.prompts))
            work = [state.batcher.submit(req.prompts)]
            if by_generation:
                state.previews.admit(len(req.prompts))
                work.append(state.previews.submit(req.prompts))
            found = await await_work(state, request, asyncio.gather(*work),
                                     endpoint="/v1/detect")
        except QueueFull as e:
            raise busy(str(e), e.retry_after) from None
        scores, verdicts = found[0], found[1] if by_generation else [None] * len(req.prompts)
        thr = engine.threshold
        results = []
        for p, s, n, v in zip(req.prompts, scores, tokens, verdicts, strict=True):
            if v is not None and not req.evidence:
                v = {k: x for k, x in v.items() if not k.endswith("_png")}
            results.append({"prompt": p, "score": s, "threshold": thr, "flagged": s > thr,
                            "tokens": n, "truncated": n > engine.context_tokens,
                            **verdict_fields(s, thr, v)})
        await audit_prompts(state, request, "/v1/detect", req.prompts, scores)
        for r in results:
            state.metrics.prompts.inc("flagged" if r["flagged"] else "clear")
        return {"threshold": thr, "results": results}

    @app.post("/v1/explain", response_model=ExplainResponse, dependencies=security,
              summary="Word attributions and suggested edits with their scores")
    async def explain(req: ExplainRequest, request: Request) -> dict:
        check_prompts(state, [req.prompt])
        out = await in_worker(state, request, "/v1/explain", engine.explain, req.prompt,
                              top_k=req.top_k)
        await audit_prompts(state, request, "/v1/explain", [req.prompt], [out["score"]])
        return out

    @app.post("/v1/generate", response_model=GenerateResponse, dependencies=security,
              summary="Generate plain and mitigated images (base64 PNG)")
    async def generate(req: GenerateRequest, request: Request) -> dict:
        check_prompts(state, [req.prompt])
        detail = mitigation_detail(req.mitigate)  # unknown method: ConfigError -> 422 first
        out = await in_worker(state, request, "/v1/generate", engine.generate, req.prompt,
                              mitigate=req.mitigate, compare=req.compare, seed=req.seed,
                              steps=req.steps, guidance_scale=req.guidance_scale)
        await audit_prompts(state, request, "/v1/generate", [req.prompt],
                            [out["detection"]["score"]], detail=detail)
        return out


# ------------------------------------------------------------------------------ operator's routes


def readiness(state: AppState) -> tuple[bool, dict]:
    """Whether the service can answer ``/v1`` requests now: the model (its last batch did not
    fail), the batcher, the worker pool, the audit writer, not shutting down."""
    b, audit = state.batcher, state.audit
    checks = {
        "model": "ok" if b is None or b.last_error is None else f"last batch failed ({b.last_error})",
        "batcher": "ok" if b is not None and b.alive else "not running",
        "previews": "off" if state.previews is None else (
            "ok" if state.previews.alive else "not running"),
        "workers": "ok" if state.workers is not None and not getattr(state.workers, "_shutdown",
                                                                       False) else "not running",
        "audit": "off" if audit is None else (audit.problem() or "ok"),
        "shutdown": "shutting down" if state.shutting_down else "no",
    }
    ok = all(v in ("ok", "off", "no") for v in checks.values())
    state.metrics.ready.set(1 if ok else 0)
    return ok, checks


def page_csp(page: str) -> str:
    """A Content-Security-Policy allowing exactly the page's inline script and style (by hash),
    images from data: URLs (the PNGs) and requests to this server; no framing."""
    def hashes(tag: str) -> str:
        out, rest = [], page
        while f"<{tag}>" in rest:
            body = rest.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]
            digest = base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode()
            out.append(f"'sha256-{digest}'")
            rest = rest.split(f"</{tag}>", 1)[1]
        return " ".join(out)

    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
            "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


def add_ops_routes(app: FastAPI, state: AppState) -> None:
    """``GET /livez`` (liveness), ``/readyz`` (readiness, 503 when not ready), ``/healthz`` (the
    model, threshold, limits and the readiness checks), ``/metrics`` (Prometheus text) and ``/``
    (the page, read once here, served with its CSP)."""
    from diffmem.mitigate import MITIGATIONS

    engine, cfg = state.engine, state.config
    mitigations = ["none", "auto", *MITIGATIONS]

    @app.get("/livez", summary="Liveness: the process answers and its batcher runs")
    async def livez() -> JSONResponse:
        alive = state.batcher is not None and state.batcher.alive
        return JSONResponse({"status": "alive" if alive else "batcher stopped"},
                            status_code=200 if alive else 503)

    @app.get("/readyz", summary="Readiness: model, batcher, workers and audit writer")
    async def readyz() -> JSONResponse:
        ok, checks = readiness(state)
        body = {"status": "ready", "checks": checks} if ok else {
            "error": "not ready: " + "; ".join(f"{k}: {v}" for k, v in checks.items()
                                               if v not in ("ok", "off", "no")),
            "checks": checks}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/healthz", summary="The model, the threshold, the limits and readiness")
    async def healthz() -> JSONResponse:
        ok, checks = readiness(state)
        body = {"status": "ok" if ok else "unready", "checks": checks, "version": __version__,
                "model": cfg.model_name, "threshold": engine.threshold,
                "index": engine.index is not None,
                "verdict": "generation" if engine.judge is not None else "first_step_estimate",
                "auth": cfg.api_key is not None,
                "mitigations": mitigations,
                "queued_prompts": state.batcher.queued if state.batcher else 0,
                "jobs": state.jobs,
                "limits": {k: v for k, v in asdict(cfg).items()
                           if k not in ("api_key", "model_name", "host", "allowed_hosts",
                                        "forwarded_allow_ips")},
                "context_tokens": engine.context_tokens}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse,
             summary="Prometheus text format: requests, admission, batches, audit, build")
    async def metrics() -> PlainTextResponse:
        readiness(state)
        return PlainTextResponse(state.metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    page = resources.files("diffmem.server").joinpath("static/index.html").read_text("utf-8")
    csp = page_csp(page)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": csp,
                                           "Cache-Control": "no-store"})

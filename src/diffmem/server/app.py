"""The guard service: FastAPI app with micro-batched detection, explanations, generation and a page.

Routes: ``POST /v1/detect``, ``POST /v1/explain``, ``POST /v1/generate``, ``GET /healthz``,
``GET /metrics`` (Prometheus text), ``GET /`` (the page), ``/openapi.json`` and ``/docs``.
Every rejection is a 4xx with ``{"error": "<one-line reason>"}``; the reason of a rejected ``/v1``
request is also the only thing the audit log keeps of it. Model work runs in worker threads
(:mod:`diffmem.server.engine`), never on the event loop.
"""

import asyncio
import hmac
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Annotated

from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffmem import __version__
from diffmem.runtime.defaults import SAMPLING
from diffmem.runtime.errors import DiffmemError
from diffmem.server.audit import AuditLog
from diffmem.server.batching import MicroBatcher, QueueFull
from diffmem.server.engine import Cancelled, Engine
from diffmem.server.metrics import Metrics

log = logging.getLogger("diffmem.server")

ENDPOINTS = ("/v1/detect", "/v1/explain", "/v1/generate", "/healthz", "/metrics", "/",
             "/openapi.json", "/docs")


@dataclass
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


class ApiError(Exception):
    """A rejection: HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str, headers: dict | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.headers = status, " ".join(reason.split()), headers


def _error(request_scope: dict, status: int, reason: str, headers: dict | None = None
           ) -> JSONResponse:
    reason = " ".join(str(reason).split()) or "rejected"
    request_scope.setdefault("state", {})["reject_reason"] = reason
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


# ------------------------------------------------------------------------------ schemas

class DetectResult(BaseModel):
    prompt: str
    score: float = Field(description="first-step noise magnitude (Wen et al. 2024, eq. 4)")
    threshold: float
    flagged: bool = Field(description="score > threshold")
    tokens: int = Field(description="prompt tokens (BOS/EOS not counted)")
    truncated: bool = Field(description="the prompt was cut to the text encoder's context")


class DetectResponse(BaseModel):
    threshold: float
    results: list[DetectResult]


class Word(BaseModel):
    text: str
    score: float = Field(description="share of the attribution (all words sum to 1)")
    span: list[int] | None = Field(description="[start, end) in the prompt, when known")
    trigger: bool = Field(description="flagged prompt and at least half the top word's share")


class Suggestion(BaseModel):
    prompt: str
    label: str
    action: str
    words: list[str]
    replacement: str | None
    score: float
    clears: bool | None


class ExplainResponse(BaseModel):
    prompt: str
    score: float
    threshold: float
    flagged: bool
    truncated: bool
    words: list[Word]
    suggestions: list[Suggestion]


class Nearest(BaseModel):
    id: str | None = None
    caption: str | None = None
    score: float | None = None
    criterion: str | None = None
    higher_is_better: bool | None = None
    copy_threshold: float | None = None
    is_copy: bool | None = None
    png: str | None = Field(default=None, description="the training image, base64 PNG")


class GeneratedImage(BaseModel):
    png: str = Field(description="base64 PNG")
    nearest: Nearest | None = Field(default=None, description="nearest training image "
                                                              "(only when the server has --index)")
    records: dict | None = Field(default=None, description="what each mitigation did")


class Detection(BaseModel):
    score: float
    flagged: bool


class GenerateResponse(BaseModel):
    prompt: str
    seed: int
    steps: int
    guidance_scale: float
    mitigate: str
    threshold: float
    truncated: bool
    detection: Detection = Field(description="the prompt's score and flag as /v1/detect gives "
                                             "them")
    images: dict[str, GeneratedImage] = Field(description="'plain' and/or 'mitigated'")


class ErrorResponse(BaseModel):
    error: str = Field(description="one-line reason")


def _request_models(cfg: ServerConfig, mitigations: list[str]):
    Prompt = Annotated[str, StringConstraints(max_length=cfg.max_prompt_chars)]
    OnePrompt = Annotated[str, StringConstraints(min_length=1, max_length=cfg.max_prompt_chars)]

    class DetectRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        prompts: list[Prompt] = Field(min_length=1, max_length=cfg.max_prompts,
                                      description=f"1 to {cfg.max_prompts} prompts")

    class ExplainRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        prompt: OnePrompt
        top_k: int = Field(default=5, ge=1, le=10,
                           description="words to edit, alone and the top 2..k together")

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        prompt: OnePrompt
        mitigate: Annotated[str, StringConstraints(max_length=200)] = Field(
            default="auto", description="'none', 'auto' (gated by the calibrated threshold), or "
            f"NAME[:STRENGTH][,NAME...] of {', '.join(mitigations)}")
        compare: bool = Field(default=True, description="also return the plain image "
                                                        "(same seed) beside the mitigated one")
        seed: int = Field(default=0, ge=0, le=2**31 - 1)
        steps: int = Field(default=min(SAMPLING.steps, cfg.max_steps), ge=1, le=cfg.max_steps)
        guidance_scale: float = Field(default=SAMPLING.guidance_scale, ge=0.0, le=30.0)

    return DetectRequest, ExplainRequest, GenerateRequest


# ------------------------------------------------------------------------------ middleware

class GuardMiddleware:
    """API key and body-size checks before anything else; metrics and rejection audit after."""

    def __init__(self, app, *, state: "AppState") -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        st = self.state
        t0 = time.perf_counter()
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status_box = [500]

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            await send(message)

        try:
            rejection = self._check_key(scope) if path.startswith("/v1/") else None
            if rejection is None:
                body, rejection = await self._read_body(scope, receive)
            if rejection is not None:
                await rejection(scope, receive, send_wrapper)
            else:
                scope["diffmem.body"] = body
                await self.app(scope, _replay(body, receive), send_wrapper)
        finally:
            status = status_box[0]
            st.metrics.requests.inc(endpoint, str(status))
            st.metrics.latency.observe(time.perf_counter() - t0, endpoint)
            if 400 <= status < 500:
                st.metrics.rejections.inc(str(status))
                if st.audit is not None and path.startswith("/v1/"):
                    reason = scope.get("state", {}).get("reject_reason", f"HTTP {status}")
                    st.audit.rejection(endpoint, _client(scope), status, reason)

    def _check_key(self, scope) -> JSONResponse | None:
        key = self.state.config.api_key
        if key is None:
            return None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        given = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if not given:
            return _error(scope, 401, "missing API key: send 'Authorization: Bearer KEY' or "
                                      "'X-API-Key: KEY'", {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                                   key.encode("utf-8")):
            return _error(scope, 401, "wrong API key", {"WWW-Authenticate": "Bearer"})
        return None

    async def _read_body(self, scope, receive) -> tuple[bytes, JSONResponse | None]:
        limit = self.state.config.max_body_bytes
        for k, v in scope.get("headers", []):
            if k.lower() == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    return b"", _error(scope, 400, "Content-Length is not a number")
                if n > limit:
                    return b"", _error(scope, 413, f"request body of {n} bytes is over the "
                                                   f"limit of {limit} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", _error(scope, 413, f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), None


def _replay(body: bytes, receive):
    """The body read once, then the connection's own messages (a disconnect, when it comes)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _is_json(scope) -> bool:
    try:
        json.loads(scope.get("diffmem.body", b""))
    except ValueError:
        return False
    return True


def _client(scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


# ------------------------------------------------------------------------------ app

@dataclass
class AppState:
    engine: Engine
    config: ServerConfig
    metrics: Metrics
    audit: AuditLog | None
    batcher: MicroBatcher | None = None
    workers: ThreadPoolExecutor | None = None


def create_app(engine: Engine, config: ServerConfig | None = None, *,
               audit: AuditLog | None = None) -> FastAPI:
    """The service around one :class:`Engine` (one loaded model)."""
    from diffmem.mitigate import MITIGATIONS

    cfg = config or ServerConfig()
    if cfg.max_tokens is None:
        cfg.max_tokens = engine.context_tokens
    if cfg.model_name is None:
        from diffmem.testbed import testbed_path

        path = engine.adapter.path
        cfg.model_name = ("testbed" if path is not None and path.resolve() == testbed_path().resolve()
                          else str(path) if path is not None else type(engine.adapter.pipe).__name__)
    for name in ("max_prompts", "max_tokens", "max_prompt_chars", "max_body_bytes", "max_batch",
                 "max_queue", "max_steps", "workers"):
        if int(getattr(cfg, name)) < 1:
            raise DiffmemError(f"{name} must be >= 1")
    if cfg.timeout_s <= 0 or cfg.max_wait_ms < 0:
        raise DiffmemError("timeout must be > 0 and the batch wait >= 0")
    state = AppState(engine, cfg, Metrics(), audit)
    mitigations = ["none", "auto", *MITIGATIONS]
    DetectRequest, ExplainRequest, GenerateRequest = _request_models(cfg, list(MITIGATIONS))
    batch_thread = ThreadPoolExecutor(1, thread_name_prefix="diffmem-batch")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.workers = ThreadPoolExecutor(cfg.workers, thread_name_prefix="diffmem-work")
        state.batcher = MicroBatcher(engine.score, batch_thread, max_batch=cfg.max_batch,
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

    try:  # Swagger UI and ReDoc served from the package, not a CDN (works offline)
        from fastapi_offline import FastAPIOffline as make_app
    except ImportError:
        make_app = FastAPI
    app = make_app(
        title="diffmem guard", version=__version__, lifespan=lifespan,
        description="Memorization checks for a text-to-image model: first-step noise magnitude "
                    "(Wen et al., ICLR 2024) against a calibrated threshold, word attributions "
                    "and edits, and mitigated generation. Errors: a 4xx with "
                    "{\"error\": \"<one-line reason>\"}.",
        responses={k: {"model": ErrorResponse} for k in (400, 401, 408, 413, 422, 429)})
    app.state.guard = state
    app.add_middleware(GuardMiddleware, state=state)
    security = [Security(APIKeyHeader(name="X-API-Key", auto_error=False))] \
        if cfg.api_key else []

    # -------------------------------------------------------------- errors
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(request.scope, exc.status, exc.reason, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid" or (
                tuple(first.get("loc", ())) == ("body",) and not _is_json(request.scope)):
            return _error(request.scope, 400, "the body is not valid JSON (send a JSON object "
                                              "with Content-Type: application/json)")
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        msg = first.get("msg", "invalid request")
        if first.get("type") == "missing" and loc == "body":
            msg = "a JSON body is required"
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        return _error(request.scope, 422, f"{loc}: {msg}{more}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        reason = {404: f"not found: {request.url.path}",
                  405: f"method {request.method} not allowed on {request.url.path}"}.get(
            exc.status_code, str(exc.detail))
        return _error(request.scope, exc.status_code, reason, getattr(exc, "headers", None))

    @app.exception_handler(DiffmemError)
    async def _diffmem(request: Request, exc: DiffmemError):
        return _error(request.scope, 422, str(exc))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)

    # -------------------------------------------------------------- helpers
    def check_prompts(prompts: list[str]) -> list[int]:
        tokens = engine.count_tokens(prompts)
        for i, n in enumerate(tokens):
            if n > cfg.max_tokens:
                what = "the text encoder's context" if cfg.max_tokens == engine.context_tokens \
                    else "the server's limit"
                raise ApiError(422, f"prompt {i} has {n} tokens, over the limit of "
                                    f"{cfg.max_tokens} ({what})")
        return tokens

    async def in_time(awaitable):
        try:
            return await asyncio.wait_for(awaitable, cfg.timeout_s)
        except TimeoutError:
            raise ApiError(408, f"the request took longer than the limit of {cfg.timeout_s:g} s; "
                                "nothing was returned") from None

    async def in_worker(fn, *args, cancel: threading.Event | None = None, **kwargs):
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(state.workers, lambda: fn(*args, **kwargs))
        try:
            return await in_time(fut)
        except ApiError:
            if cancel is not None:
                cancel.set()
            raise

    # -------------------------------------------------------------- routes
    @app.post("/v1/detect", response_model=DetectResponse, dependencies=security,
              summary="Score prompts for memorization (micro-batched)")
    async def detect(req: DetectRequest, request: Request) -> dict:
        tokens = check_prompts(req.prompts)
        try:
            scores = await in_time(state.batcher.submit(req.prompts))
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}; retry later", {"Retry-After": "1"}) from None
        thr = engine.threshold
        results = [{"prompt": p, "score": s, "threshold": thr, "flagged": s > thr, "tokens": n,
                    "truncated": n > engine.context_tokens}
                   for p, s, n in zip(req.prompts, scores, tokens, strict=True)]
        for r in results:
            state.metrics.prompts.inc("flagged" if r["flagged"] else "clear")
        if state.audit is not None:
            state.audit.prompts("/v1/detect", _client(request.scope), req.prompts, scores, thr)
        return {"threshold": thr, "results": results}

    @app.post("/v1/explain", response_model=ExplainResponse, dependencies=security,
              summary="Word attributions and suggested edits with their scores")
    async def explain(req: ExplainRequest, request: Request) -> dict:
        check_prompts([req.prompt])
        out = await in_worker(engine.explain, req.prompt, top_k=req.top_k)
        if state.audit is not None:
            state.audit.prompts("/v1/explain", _client(request.scope), [req.prompt],
                                [out["score"]], engine.threshold)
        return out

    @app.post("/v1/generate", response_model=GenerateResponse, dependencies=security,
              summary="Generate plain and mitigated images (base64 PNG)")
    async def generate(req: GenerateRequest, request: Request) -> dict:
        from diffmem.mitigate import parse_spec

        check_prompts([req.prompt])
        parse_spec(req.mitigate)  # unknown method: ConfigError -> 422 before any work
        cancel = threading.Event()
        try:
            out = await in_worker(engine.generate, req.prompt, mitigate=req.mitigate,
                                  compare=req.compare, seed=req.seed, steps=req.steps,
                                  guidance_scale=req.guidance_scale, cancel=cancel)
        except Cancelled as e:
            raise ApiError(408, str(e)) from None
        if state.audit is not None:
            state.audit.prompts("/v1/generate", _client(request.scope), [req.prompt],
                                [out["detection"]["score"]], engine.threshold,
                                detail=f"mitigate={req.mitigate}")
        return out

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

    return app


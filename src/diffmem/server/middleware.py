"""The ASGI middleware in front of every route: API key and body-size checks before the app,
request metrics and the audit row of a rejected ``/v1`` request after it."""

import hmac
import time

from fastapi.responses import JSONResponse

from diffmem.server.config import AppState
from diffmem.server.errors import error_response

ENDPOINTS = ("/v1/detect", "/v1/explain", "/v1/generate", "/healthz", "/metrics", "/",
             "/openapi.json", "/docs")


class GuardMiddleware:
    """API key and body-size checks before anything else; metrics and rejection audit after."""

    def __init__(self, app, *, state: AppState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status_box = [500]

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            await send(message)

        try:
            await self._check_then_forward(scope, receive, send_wrapper)
        finally:
            self._record(scope, status_box[0], time.perf_counter() - t0)

    async def _check_then_forward(self, scope, receive, send) -> None:
        """The key (on ``/v1``) and the body size; the app gets the body read once, or the
        client gets the rejection."""
        path = scope.get("path", "")
        rejection = self._check_key(scope) if path.startswith("/v1/") else None
        if rejection is None:
            body, rejection = await self._read_body(scope, receive)
        if rejection is not None:
            await rejection(scope, receive, send)
        else:
            scope["diffmem.body"] = body
            await self.app(scope, _replay(body, receive), send)

    def _record(self, scope, status: int, seconds: float) -> None:
        """Request count and latency by endpoint; a 4xx counted, and audited on ``/v1``."""
        st = self.state
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        st.metrics.requests.inc(endpoint, str(status))
        st.metrics.latency.observe(seconds, endpoint)
        if 400 <= status < 500:
            st.metrics.rejections.inc(str(status))
            if st.audit is not None and path.startswith("/v1/"):
                reason = scope.get("state", {}).get("reject_reason", f"HTTP {status}")
                st.audit.rejection(endpoint, client_host(scope), status, reason)

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
            return error_response(scope, 401, "missing API key: send 'Authorization: Bearer KEY' "
                                              "or 'X-API-Key: KEY'", {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                                   key.encode("utf-8")):
            return error_response(scope, 401, "wrong API key", {"WWW-Authenticate": "Bearer"})
        return None

    async def _read_body(self, scope, receive) -> tuple[bytes, JSONResponse | None]:
        limit = self.state.config.max_body_bytes
        for k, v in scope.get("headers", []):
            if k.lower() == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    return b"", error_response(scope, 400, "Content-Length is not a number")
                if n > limit:
                    return b"", error_response(scope, 413, f"request body of {n} bytes is over "
                                                           f"the limit of {limit} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", error_response(scope, 413,
                                           f"request body is over the limit of {limit} bytes")
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


def client_host(scope) -> str | None:
    """The client's address, as the audit log keeps it (``None`` when unknown)."""
    client = scope.get("client")
    return client[0] if client else None

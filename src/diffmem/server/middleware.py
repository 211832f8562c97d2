"""The ASGI middleware in front of every route.

Before the app: the ``Host`` allow-list (DNS rebinding), the in-flight limit and the shutdown
state (503 with ``Retry-After``), on ``/v1`` the API key (compared as bytes, in constant time)
and, in fail-closed mode, the audit log's health, then the body size. After it: security headers
on every response, request metrics, and the audit row of a rejected ``/v1`` request (its status
and kind, nothing it sent).
"""

import hmac
import time

from fastapi.responses import JSONResponse

from diffmem.server.config import AppState
from diffmem.server.endpoints import endpoint_of
from diffmem.server.errors import error_response, kind_of

#: answered even when the server is full or shutting down (operators must see why)
OPS = ("/livez", "/readyz", "/healthz", "/metrics")
#: on every response; the page adds its own Content-Security-Policy
SECURITY_HEADERS = ((b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cross-origin-opener-policy", b"same-origin"))
FRAME_CSP = (b"content-security-policy", b"frame-ancestors 'none'")


class GuardMiddleware:
    """Admission and trust checks before anything else; headers, metrics and audit after."""

    def __init__(self, app, *, state: AppState) -> None:
        self.app = app
        self.state = state
        self._by_endpoint: dict[str, int] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status_box = [500]
        endpoint = endpoint_of(scope)

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                headers += [h for h in SECURITY_HEADERS if h[0] not in names]
                if b"content-security-policy" not in names:
                    headers.append(FRAME_CSP)
                message = {**message, "headers": headers}
            await send(message)

        st = self.state
        st.in_flight += 1
        self._by_endpoint[endpoint] = self._by_endpoint.get(endpoint, 0) + 1
        st.metrics.in_flight.set(self._by_endpoint[endpoint], endpoint)
        try:
            await self._check_then_forward(scope, receive, send_wrapper)
        finally:
            st.in_flight -= 1
            self._by_endpoint[endpoint] -= 1
            st.metrics.in_flight.set(self._by_endpoint[endpoint], endpoint)
            self._record(scope, endpoint, status_box[0], time.perf_counter() - t0)

    async def _check_then_forward(self, scope, receive, send) -> None:
        """The checks; the app gets the body read once, or the client gets the rejection."""
        path = scope.get("path", "")
        rejection = self._check_host(scope) or self._check_admission(scope, path)
        if rejection is None and path.startswith("/v1/"):
            rejection = self._check_key(scope) or self._check_audit(scope)
        if rejection is None:
            body, rejection = await self._read_body(scope, receive)
        if rejection is not None:
            await rejection(scope, receive, send)
        else:
            scope["diffmem.body"] = body
            await self.app(scope, _replay(body, receive), send)

    def _record(self, scope, endpoint: str, status: int, seconds: float) -> None:
        """Request count and latency by endpoint; a rejection counted by kind, and audited on
        ``/v1``."""
        st = self.state
        st.metrics.requests.inc(endpoint, str(status))
        st.metrics.latency.observe(seconds, endpoint)
        if status >= 400:
            kind = scope.get("state", {}).get("reject_kind") or kind_of(status)
            st.metrics.rejections.inc(str(status), kind)
            if st.audit is not None and scope.get("path", "").startswith("/v1/"):
                st.audit.rejection(endpoint, client_host(scope), status, kind)

    def _check_host(self, scope) -> JSONResponse | None:
        allowed = self.state.config.allowed_hosts
        if allowed is None or "*" in allowed:
            return None
        host = _header(scope, b"host").decode("latin-1").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if host in allowed or name in allowed:
            return None
        return error_response(scope, 400, "Host header not allowed (the server answers to: "
                                          f"{', '.join(allowed)})", kind="bad_host")

    def _check_admission(self, scope, path: str) -> JSONResponse | None:
        st = self.state
        if path in OPS:
            return None
        if st.shutting_down:
            return error_response(scope, 503, "the server is shutting down; retry on another "
                                              "instance", {"Retry-After": "5", "Connection": "close"},
                                  kind="shutting_down")
        if st.in_flight > st.config.max_in_flight:
            return error_response(scope, 503, f"server busy: over {st.config.max_in_flight} "
                                              "requests in flight; retry later",
                                  {"Retry-After": "1"}, kind="overloaded")
        return None

    def _check_key(self, scope) -> JSONResponse | None:
        key = self.state.config.api_key
        if key is None:
            return None
        given = _header(scope, b"x-api-key", None)
        auth = _header(scope, b"authorization")
        if given is None and auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        if not given:
            return error_response(scope, 401, "missing API key: send 'Authorization: Bearer KEY' "
                                              "or 'X-API-Key: KEY'", {"WWW-Authenticate": "Bearer"},
                                  kind="auth_missing")
        # bytes against bytes: a key of any characters matches when the client sends its UTF-8
        if not hmac.compare_digest(given, key.encode("utf-8")):
            return error_response(scope, 401, "wrong API key", {"WWW-Authenticate": "Bearer"},
                                  kind="auth_wrong")
        return None

    def _check_audit(self, scope) -> JSONResponse | None:
        st = self.state
        if st.audit is None or not st.config.audit_fail_closed or st.audit.healthy:
            return None
        return error_response(scope, 503, "the audit log cannot be written; requests are refused "
                                          "until it can", {"Retry-After": "5"},
                              kind="audit_unavailable")

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


def _header(scope, name: bytes, default=b""):
    """The raw bytes of the first header ``name`` (lower case), or ``default``."""
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v
    return default


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
    """The client's address, as the audit log keeps it (``None`` when unknown): the socket's
    peer, or what a proxy named in ``forwarded_allow_ips`` said (uvicorn rewrites it)."""
    client = scope.get("client")
    return client[0] if client else None

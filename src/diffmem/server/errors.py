"""Rejections: :class:`ApiError`, the ``{"error": "<one-line reason>"}`` response, and the
exception handlers that turn every failure into one.

The rejection's *kind*, a fixed word (``not_found``, ``invalid``, ``timeout``, ...), is kept in
the request scope (``state.reject_kind``) for the audit log and the metrics, which the middleware
writes after the response; the reason (which may quote what the client sent) is never stored.
"""

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffmem.runtime.errors import DiffmemError
from diffmem.server.endpoints import endpoint_of

log = logging.getLogger("diffmem.server")


#: the kind of a rejection when none is given, by status
KINDS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
         413: "body_too_large", 422: "invalid", 429: "rate_limited", 499: "disconnected",
         500: "internal", 503: "unavailable", 504: "timeout"}


def kind_of(status: int) -> str:
    return KINDS.get(status, "client_error" if status < 500 else "server_error")


class ApiError(Exception):
    """A rejection: HTTP status, a one-line reason (for the client) and a kind (a fixed word, for
    the audit log and the metrics)."""

    def __init__(self, status: int, reason: str, headers: dict | None = None,
                 kind: str | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.headers = status, " ".join(reason.split()), headers
        self.kind = kind or kind_of(status)


def error_response(request_scope: dict, status: int, reason: str, headers: dict | None = None,
                   kind: str | None = None) -> JSONResponse:
    """``{"error": reason}`` with ``status``; the kind is noted in the scope."""
    reason = " ".join(str(reason).split()) or "rejected"
    request_scope.setdefault("state", {})["reject_kind"] = kind or kind_of(status)
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


def _is_json(scope) -> bool:
    try:
        json.loads(scope.get("diffmem.body", b""))
    except ValueError:
        return False
    return True


async def _api_error(request: Request, exc: ApiError):
    return error_response(request.scope, exc.status, exc.reason, exc.headers, exc.kind)


async def _validation(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid" or (
            tuple(first.get("loc", ())) == ("body",) and not _is_json(request.scope)):
        return error_response(request.scope, 400, "the body is not valid JSON (send a JSON object "
                                                  "with Content-Type: application/json)",
                              kind="invalid_json")
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    msg = first.get("msg", "invalid request")
    if first.get("type") == "missing" and loc == "body":
        msg = "a JSON body is required"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return error_response(request.scope, 422, f"{loc}: {msg}{more}")


async def _http(request: Request, exc: StarletteHTTPException):
    reason = {404: f"not found: {request.url.path}",
              405: f"method {request.method} not allowed on {request.url.path}"}.get(
        exc.status_code, str(exc.detail))
    return error_response(request.scope, exc.status_code, reason, getattr(exc, "headers", None))


async def _diffmem(request: Request, exc: DiffmemError):
    return error_response(request.scope, 422, str(exc))


async def _internal(request: Request, exc: Exception):
    log.error("internal error on %s: %s", endpoint_of(request.scope), type(exc).__name__,
              exc_info=exc)
    return error_response(request.scope, 500, f"internal error ({type(exc).__name__})")


def add_error_handlers(app: FastAPI) -> None:
    """Every failure as ``{"error": ...}``: :class:`ApiError` with its status, invalid JSON 400, a
    validation error 422, 404/405 and other HTTP errors, :class:`DiffmemError` 422, anything else
    500 (logged)."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(DiffmemError, _diffmem)
    app.add_exception_handler(Exception, _internal)

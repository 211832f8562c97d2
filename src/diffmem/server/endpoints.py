"""The service's routes by name: what metrics and the audit may record of a request's path."""

from __future__ import annotations

ENDPOINTS = ("/v1/detect", "/v1/explain", "/v1/generate", "/healthz", "/livez", "/readyz",
             "/metrics", "/", "/openapi.json", "/docs")


def endpoint_of(scope) -> str:
    """The route's path when it is one of the service's, else ``other`` (never the raw path)."""
    path = scope.get("path", "")
    return path if path in ENDPOINTS else "other"

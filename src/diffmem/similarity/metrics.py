"""Replication metrics over many generations (Somepalli et al., CVPR 2023 and NeurIPS 2023).

For each generation the score is its maximum similarity to the training set (SSCD cosine; or the
minimum tiled-L2 distance in pixel space). Over a set of generations DCR reports the mean, the 95th
percentile (the headline "top 5 %" number) and the share of generations above 0.5
("memorization rate"); Chen et al. (AMG, CVPR 2024, Table 1) report the same.

Direction: with ``higher_is_better=True`` (similarities) a generation is a copy when its score is
*above* the threshold and ``p95`` is the 95th percentile; with ``higher_is_better=False``
(distances) it is a copy when *below* and ``p95`` is the 5th percentile -- in both cases the value
that only the 5 % most copy-like generations pass.

As in scikit-learn, degenerate input (no scores, all NaN) warns and yields NaN instead of raising.
Each metric exists as a function and as a stateful class (torchmetrics style) sharing the private
helpers below.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.nn import functional as F

from diffmem.models.profile import CopyCriterion

#: Conventional SSCD copy threshold (Somepalli et al. 2023; Chen et al. 2024).
SSCD_THRESHOLD = 0.5


class DegenerateInputWarning(UserWarning):
    """Metric input was empty or all-NaN; the result is NaN."""


# -- private helpers shared by the function and the class ------------------------------------------
def _clean(scores: torch.Tensor | list[float]) -> torch.Tensor:
    x = torch.as_tensor(scores, dtype=torch.float64).flatten()
    return x[~torch.isnan(x)]


def _summary(x: torch.Tensor, threshold: float, higher_is_better: bool) -> dict[str, float]:
    nan = math.nan
    if x.numel() == 0:
        warnings.warn("replication summary of no (non-NaN) scores; returning NaN",
                      DegenerateInputWarning, stacklevel=3)
        return {"mean": nan, "p95": nan, "memorization_rate": nan, "n": 0}
    q = 0.95 if higher_is_better else 0.05
    copies = CopyCriterion("score", threshold, higher_is_copy=higher_is_better).copies(x)
    return {"mean": x.mean().item(), "p95": torch.quantile(x, q).item(),
            "memorization_rate": copies.double().mean().item(), "n": int(x.numel())}


# -- public API -----------------------------------------------------------------------------------
def max_similarity(queries: torch.Tensor, index: object) -> tuple[torch.Tensor, list[str]]:
    """Each generation's best score against a :class:`~diffmem.similarity.index.TrainingIndex`
    (max cosine, or min tiled-L2 for a pixel index) and the id of that training item."""
    result = index.search(queries, k=1)
    return result.scores[:, 0], [r[0] for r in result.ids]


def replication_summary(scores: torch.Tensor | list[float], *, threshold: float = SSCD_THRESHOLD,
                        higher_is_better: bool = True) -> dict[str, float]:
    """Mean, p95 and memorization rate (share past ``threshold``) of per-generation scores.

    Returns ``{"mean", "p95", "memorization_rate", "n"}``; NaN scores are ignored. Empty input
    warns (:class:`DegenerateInputWarning`) and returns NaN values.
    """
    return _summary(_clean(scores), threshold, higher_is_better)


class ReplicationMeter:
    """Stateful :func:`replication_summary`: ``update(scores)`` per batch, then ``compute()``."""

    def __init__(self, *, threshold: float = SSCD_THRESHOLD, higher_is_better: bool = True):
        self.threshold = threshold
        self.higher_is_better = higher_is_better
        self.reset()

    def reset(self) -> None:
        self._scores: list[torch.Tensor] = []

    def update(self, scores: torch.Tensor | list[float]) -> None:
        self._scores.append(_clean(scores))

    def compute(self) -> dict[str, float]:
        x = torch.cat(self._scores) if self._scores else torch.zeros(0, dtype=torch.float64)
        return _summary(x, self.threshold, self.higher_is_better)


def self_similarity(embeddings: torch.Tensor, *, chunk: int = 1024) -> tuple[torch.Tensor,
                                                                              torch.Tensor]:
    """Dataset self-duplication: for each training embedding, the max cosine to any *other* one.

    Somepalli et al. (NeurIPS 2023) report this "dataset similarity" (its 95th percentile) as the
    baseline a model's replication should be compared with. Computed ``chunk`` rows at a time, so
    memory is O(chunk * N), never N x N. Returns ``(max cosine (N,), index of that item (N,))``;
    with fewer than two items warns and returns NaN / -1.
    """
    n = embeddings.shape[0]
    if n < 2:
        warnings.warn("self-similarity needs at least two items; returning NaN",
                      DegenerateInputWarning, stacklevel=2)
        return torch.full((n,), math.nan), torch.full((n,), -1, dtype=torch.long)
    e = F.normalize(embeddings.float(), dim=-1)
    best, arg = [], []
    for i in range(0, n, chunk):
        s = e[i : i + chunk] @ e.T
        rows = torch.arange(s.shape[0])
        s[rows, rows + i] = -math.inf
        v, j = s.max(1)
        best.append(v)
        arg.append(j)
    return torch.cat(best), torch.cat(arg)


def self_tiled_l2(images: torch.Tensor, *, grid: int = 4,
                  chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-space self-duplication: each image's tiled-L2 distance to its nearest *other* image.

    Chunked like :func:`self_similarity` (memory O(chunk * N)). Returns ``(distance, index)``.
    """
    from diffmem.similarity.pixel import pairwise_tiled_l2

    n = images.shape[0]
    if n < 2:
        warnings.warn("self-similarity needs at least two items; returning NaN",
                      DegenerateInputWarning, stacklevel=2)
        return torch.full((n,), math.nan), torch.full((n,), -1, dtype=torch.long)
    best, arg = [], []
    for i in range(0, n, chunk):
        d = pairwise_tiled_l2(images[i : i + chunk].float(), images.float(), grid=grid)
        rows = torch.arange(d.shape[0])
        d[rows, rows + i] = math.inf
        v, j = d.min(1)
        best.append(v)
        arg.append(j)
    return torch.cat(best), torch.cat(arg)


def index_self_duplication(index: object, *, chunk: int = 1024) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """:func:`self_similarity` or :func:`self_tiled_l2` over the items of a training index."""
    if index.kind == "pixel":
        from diffmem.runtime.images import to_unit_range

        images = to_unit_range(index.pixel_array())
        return self_tiled_l2(images, grid=index.embedder.grid, chunk=min(chunk, 256))
    return self_similarity(index.vectors(), chunk=chunk)

"""Fine-tuning data: image-caption pairs from the index's sources, checked, resized and de-duplicated.

Sources (:mod:`diffmem.similarity.sources`): a folder of ``x.png`` + ``x.txt``, a JSONL file
(``{"image": "path", "caption": "text" | ["text", ...]}``) or a Parquet table. Unreadable images
and rows without a caption are skipped and listed (never fatal); a source with no usable pair is a
:class:`~diffmem.runtime.errors.ConfigError`.

Images are resized (short side, bilinear, antialiased) and centre-cropped to the model's
resolution, as Hugging Face's ``train_text_to_image.py`` does (no random flip: a flipped copy is a
different image for the replication criterion).

**Near-duplicate removal** (:func:`find_duplicate_groups`, ``diffmem train --dedup``): the images
go into a :class:`~diffmem.similarity.index.TrainingIndex` (``"pixel"``: tiled L2 on 64-px
images, Carlini et al. 2023, a pair closer than ``threshold``, default 0.1; ``"sscd"``: SSCD
cosine above ``threshold``, default 0.5, Somepalli et al.'s copy threshold). Each image's ``k``
nearest neighbours within the threshold are linked and the connected components are the groups
(transitive: a chain of near-duplicates is one group). ``keep`` images of each group stay (the
first by source order), the rest are dropped; the groups are reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from diffmem.runtime.errors import ConfigError

DEDUP_THRESHOLDS = {"pixel": 0.1, "sscd": 0.5}


@dataclass
class TrainItem:
    id: str
    captions: list[str]
    source: str
    image: torch.Tensor  # (3, R, R) in [-1, 1]


@dataclass
class Dataset:
    items: list[TrainItem]
    skipped: list[dict] = field(default_factory=list)  # {"id", "source", "reason"}
    groups: list[dict] = field(default_factory=list)  # near-duplicate groups (dedup)
    dropped: int = 0  # items removed by dedup

    def images(self) -> torch.Tensor:
        return torch.stack([it.image for it in self.items])


def fit(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize the short side to ``resolution`` and centre-crop to a square."""
    h, w = image.shape[-2:]
    if (h, w) != (resolution, resolution):
        scale = resolution / min(h, w)
        size = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
        if size != (h, w):
            image = F.interpolate(image[None].float(), size=size, mode="bilinear",
                                  antialias=True, align_corners=False)[0]
        top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image[:, top : top + resolution, left : left + resolution]
    return image.float().clamp(-1, 1)


def load_dataset(source: str | Path, resolution: int, *, image_column: str = "image",
                 caption_column: str = "caption", id_column: str | None = None) -> Dataset:
    """Every usable image-caption pair of ``source`` (module docstring)."""
    from diffmem.similarity.sources import iter_source

    path = Path(source)
    if not path.exists():
        raise ConfigError(f"training data {source} not found (a folder, .jsonl or .parquet)")
    options = ({"image_column": image_column, "caption_column": caption_column,
                "id_column": id_column} if path.suffix in (".jsonl", ".parquet") else {})
    try:
        rows = iter_source(path, **options)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from exc
    items, skipped = [], []
    for row in rows:
        captions = [c for c in (row.captions or [row.caption]) if c and c.strip()]
        if row.image is None:
            skipped.append({"id": row.id, "source": row.source,
                            "reason": f"unreadable image: {row.error}"})
        elif not captions:
            skipped.append({"id": row.id, "source": row.source, "reason": "no caption"})
        else:
            items.append(TrainItem(row.id, captions, row.source, fit(row.image, resolution)))
    if not items:
        raise ConfigError(f"no usable image-caption pair in {source} ({len(skipped)} skipped: "
                          "unreadable images or rows without a caption)")
    return Dataset(items, skipped)


def find_duplicate_groups(images: torch.Tensor, *, criterion: str = "pixel",
                          threshold: float | None = None, k: int = 64,
                          embedder: object | None = None) -> list[list[int]]:
    """Groups (lists of row numbers, each of 2+ images) of near-duplicates (module docstring)."""
    from diffmem.similarity.index import PixelSpace, TrainingIndex

    if criterion not in DEDUP_THRESHOLDS:
        raise ConfigError(f"unknown dedup criterion {criterion!r}; use 'pixel' or 'sscd'")
    threshold = DEDUP_THRESHOLDS[criterion] if threshold is None else float(threshold)
    if embedder is None:
        if criterion == "pixel":
            embedder = PixelSpace()
        else:
            from diffmem.similarity.sscd import SSCD

            embedder = SSCD()
    n = len(images)
    index = TrainingIndex.build(images, [""] * n, embedder=embedder)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    kk = min(k, n)
    for start in range(0, n, 256):
        res = index.search(images[start : start + 256], k=kk)
        close = res.scores >= threshold if res.higher_is_better else res.scores <= threshold
        for qi, row in enumerate(res.indices.tolist()):
            for j, ok in zip(row, close[qi].tolist(), strict=True):
                if ok and j >= 0:
                    a, b = root(start + qi), root(int(j))
                    if a != b:
                        parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def deduplicate(data: Dataset, *, criterion: str = "pixel", threshold: float | None = None,
                keep: int = 1, embedder: object | None = None) -> Dataset:
    """``data`` with at most ``keep`` images of each near-duplicate group; the groups recorded."""
    if keep < 1:
        raise ConfigError(f"dedup keep must be >= 1, got {keep}")
    groups = find_duplicate_groups(data.images(), criterion=criterion, threshold=threshold,
                                   embedder=embedder)
    drop: set[int] = set()
    report = []
    for g in sorted(groups, key=lambda g: g[0]):
        kept, removed = g[:keep], g[keep:]
        drop.update(removed)
        report.append({"size": len(g), "kept": [data.items[i].id for i in kept],
                       "dropped": [data.items[i].id for i in removed],
                       "captions": sorted({c for i in g for c in data.items[i].captions})})
    items = [it for i, it in enumerate(data.items) if i not in drop]
    return Dataset(items, data.skipped, report, len(drop))

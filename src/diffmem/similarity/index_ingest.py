"""Indexing a folder, JSONL file or Parquet table of training images (``diffmem index build``).

Unreadable images are skipped and listed, never fatal. The images are read by
:mod:`diffmem.similarity.sources`; the index is a :class:`~diffmem.similarity.index.TrainingIndex`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from diffmem.similarity.index import TrainingIndex
from diffmem.similarity.index_build import embedder_for_kind


@dataclass
class BuildReport:
    """What :func:`build_index_from_source` did: items indexed and the files it had to skip."""

    out: Path
    count: int
    skipped: list[dict] = field(default_factory=list)


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
        embedder = embedder_for_kind(kind)
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


def _add_items(index: TrainingIndex, items: list) -> None:
    if items:
        index.add([it.image for it in items], [it.caption for it in items],
                  [it.id for it in items], sources=[it.source for it in items])


def _progress(items: Iterable, enabled: bool) -> Iterable:
    if not enabled:
        return items
    from diffmem.runtime.progress import track

    return track(items, None, "indexing", unit="img")

"""Training images with captions from a folder, a JSONL file or a Parquet table, never crashing on
a bad file.

- Folder: every ``x.png`` / ``x.jpg`` / ``x.jpeg`` / ``x.webp`` with a caption file ``x.txt``
  beside it (missing caption -> empty caption). Searched recursively, sorted by path.
- JSONL: one JSON object per line; the image column holds a file path (relative to the JSONL
  file's folder, or absolute), the caption column text or a list of texts (every caption of the
  image: ``SourceItem.captions``; ``caption`` is the first). A line that is no JSON object becomes
  an unreadable item (listed, never fatal).
- Parquet: one row per image; the image column holds encoded bytes, or a struct with a ``bytes``
  field (Hugging Face ``datasets.Image``); the caption column holds text.

Images are returned as float ``(3, H, W)`` tensors in ``[-1, 1]``. Each item carries a *source
reference* (the file path, or ``table.parquet#row=N``) that :func:`load_source_image` reopens.
"""

from __future__ import annotations

import bisect
import functools
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffmem.runtime.errors import ConfigError, DiffmemError
from diffmem.runtime.images import to_unit_range

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class SourceItem:
    """One readable training image, or an unreadable one (``image is None``, ``error`` set)."""

    id: str
    caption: str
    source: str
    image: torch.Tensor | None
    error: str = ""
    #: every caption of the image (JSONL rows may give several); empty: just ``caption``
    captions: list[str] = field(default_factory=list)


def decode_image(data: bytes | str | Path) -> torch.Tensor:
    """Encoded bytes or a file path -> ``(3, H, W)`` float in ``[-1, 1]``; raises on bad data."""
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(stream) as im:
        im.load()
        arr = np.asarray(im.convert("RGB"))
    return to_unit_range(arr).permute(2, 0, 1)


def _try_decode(data: bytes | str | Path) -> tuple[torch.Tensor | None, str]:
    try:
        return decode_image(data), ""
    except Exception as exc:  # any decoder failure: the caller records and skips the file
        return None, f"{type(exc).__name__}: {exc}"


def iter_folder(root: str | Path) -> Iterator[SourceItem]:
    """Items of a folder of image + caption files, sorted by path."""
    root = Path(root)
    for path in folder_images(root):
        yield folder_item(root, path)


def folder_images(root: str | Path) -> list[Path]:
    """The image files of a folder source, in index order (sorted by path)."""
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def folder_item(root: str | Path, path: str | Path) -> SourceItem:
    """The item of one image file of a folder source (caption from ``x.txt`` beside it)."""
    root, path = Path(root), Path(path)
    txt = path.with_suffix(".txt")
    caption = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.exists() else ""
    image, error = _try_decode(path)
    item_id = str(path.relative_to(root).with_suffix(""))
    return SourceItem(item_id, caption, str(path.resolve()), image, error)


def _image_bytes(cell: object) -> bytes | None:
    if isinstance(cell, dict):
        cell = cell.get("bytes")
    return cell if isinstance(cell, bytes) else None


def iter_parquet(path: str | Path, *, image_column: str = "image",
                 caption_column: str = "caption", id_column: str | None = None,
                 batch_rows: int = 256) -> Iterator[SourceItem]:
    """Items of a Parquet table, read ``batch_rows`` rows at a time.

    The table and its columns are checked at once (before any row is read): a file that is no
    Parquet table raises :class:`~diffmem.runtime.errors.DiffmemError`, a column option naming no column
    :class:`~diffmem.runtime.errors.ConfigError`.
    """
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a file that is no Parquet table
        raise DiffmemError(f"could not read {path} as Parquet: {exc}") from exc
    wanted = {"image": image_column, "caption": caption_column}
    if id_column:
        wanted["id"] = id_column
    names = table.schema_arrow.names
    missing = [f"{role} column {name!r}" for role, name in wanted.items() if name not in names]
    if missing:
        raise ConfigError(f"{path} has no {' and no '.join(missing)}; its columns are: "
                          f"{', '.join(names)}")
    return _parquet_rows(path, table, image_column, caption_column, id_column, batch_rows)


def parquet_row_range(path: str | Path, start: int, stop: int, *, image_column: str = "image",
                      caption_column: str = "caption",
                      id_column: str | None = None) -> list[SourceItem]:
    """Items of rows ``[start, stop)`` of a Parquet table (as :func:`iter_parquet` numbers and
    names them), reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    columns = [image_column, caption_column] + ([id_column] if id_column else [])
    items: list[SourceItem] = []
    first = 0
    for g in range(table.metadata.num_row_groups):
        n = table.metadata.row_group(g).num_rows
        lo, hi = max(start, first), min(stop, first + n)
        if lo < hi:
            data = table.read_row_group(g, columns=columns).slice(lo - first, hi - lo).to_pydict()
            for j, cell in enumerate(data[image_column]):
                raw = _image_bytes(cell)
                image, error = _try_decode(raw) if raw is not None else (None, "no image bytes")
                row = lo + j
                item_id = str(data[id_column][j]) if id_column else str(row)
                caption = data[caption_column][j] or ""
                items.append(SourceItem(item_id, str(caption), f"{path}#row={row}", image, error))
        first += n
        if first >= stop:
            break
    return items


def _parquet_rows(path, table, image_column: str, caption_column: str, id_column: str | None,
                  batch_rows: int) -> Iterator[SourceItem]:
    columns = [image_column, caption_column] + ([id_column] if id_column else [])
    row = 0
    for batch in table.iter_batches(batch_size=batch_rows, columns=columns):
        data = batch.to_pydict()
        for j, cell in enumerate(data[image_column]):
            raw = _image_bytes(cell)
            image, error = _try_decode(raw) if raw is not None else (None, "no image bytes")
            item_id = str(data[id_column][j]) if id_column else str(row)
            caption = data[caption_column][j] or ""
            yield SourceItem(item_id, str(caption), f"{path}#row={row}", image, error)
            row += 1


def iter_jsonl(path: str | Path, *, image_column: str = "image", caption_column: str = "caption",
               id_column: str | None = None) -> Iterator[SourceItem]:
    """Items of a JSONL file (module docstring); ids default to the line number (from 0)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    return _jsonl_rows(path, image_column, caption_column, id_column)


def _jsonl_rows(path: Path, image_column: str, caption_column: str,
                id_column: str | None) -> Iterator[SourceItem]:
    import json

    with path.open(encoding="utf-8", errors="replace") as f:
        row = -1
        for line in f:
            if not line.strip():
                continue
            row += 1
            ref = f"{path}#line={row}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                yield SourceItem(str(row), "", ref, None, f"bad JSON: {exc}")
                continue
            if not isinstance(rec, dict):
                yield SourceItem(str(row), "", ref, None, "line is no JSON object")
                continue
            item_id = str(rec.get(id_column, row)) if id_column else str(row)
            raw = rec.get(caption_column)
            captions = ([str(c).strip() for c in raw if str(c).strip()] if isinstance(raw, list)
                        else [str(raw).strip()] if raw not in (None, "") else [])
            caption = captions[0] if captions else ""
            file = rec.get(image_column)
            if not isinstance(file, str) or not file:
                yield SourceItem(item_id, caption, ref, None, f"no {image_column!r} path",
                                 captions)
                continue
            image_path = Path(file) if Path(file).is_absolute() else path.parent / file
            image, error = _try_decode(image_path) if image_path.is_file() else (
                None, f"{image_path}: file not found")
            yield SourceItem(item_id, caption, str(image_path.resolve()), image, error, captions)


def iter_source(source: str | Path, **options: object) -> Iterator[SourceItem]:
    """Items of a folder, a ``.jsonl`` or a ``.parquet`` file (``options``: the column names of
    :func:`iter_parquet` / :func:`iter_jsonl`)."""
    source = Path(source)
    if source.is_dir():
        return iter_folder(source)
    if source.suffix == ".parquet" and source.is_file():
        return iter_parquet(source, **options)
    if source.suffix == ".jsonl" and source.is_file():
        options.pop("batch_rows", None)
        return iter_jsonl(source, **options)
    raise FileNotFoundError(f"{source} is neither a folder nor a .jsonl or .parquet file")


def load_source_image(ref: str, *, image_column: str = "image") -> torch.Tensor | None:
    """Reopen the image of a source reference; ``None`` if it is gone or unreadable.

    Parquet rows are read by random access: the file's row-group layout is read once (cached
    per path, size and modification time) and only the row group holding the row is read, image
    column only; the last few row groups read are kept (:data:`ROW_GROUP_CACHE` of them), so
    neighbouring rows cost no further read. A file written as one huge row group is therefore
    read whole once, then served from the cache.
    """
    path, _, row = ref.partition("#row=")
    if not row:
        return _try_decode(path)[0] if Path(path).is_file() else None
    try:
        raw = _parquet_cell(path, int(row), image_column)
    except (OSError, ValueError, KeyError, IndexError):
        return None
    return _try_decode(raw)[0] if raw is not None else None


#: row groups (one column each) kept in memory by :func:`load_source_image`
ROW_GROUP_CACHE = 4


def _file_key(path: str) -> tuple[str, int, int]:
    st = Path(path).stat()
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _row_group_starts(key: tuple[str, int, int]) -> tuple[int, ...]:
    """First row of every row group, plus the total row count (read from the footer once)."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(key[0]).metadata
    starts = [0]
    for i in range(meta.num_row_groups):
        starts.append(starts[-1] + meta.row_group(i).num_rows)
    return tuple(starts)


@functools.lru_cache(maxsize=ROW_GROUP_CACHE)
def _row_group_column(key: tuple[str, int, int], group: int, column: str) -> list:
    import pyarrow.parquet as pq

    return pq.ParquetFile(key[0]).read_row_group(group, columns=[column]).column(0).to_pylist()


def _parquet_cell(path: str, row: int, column: str) -> bytes | None:
    """Image bytes of one row of a Parquet table, reading only its row group's column."""
    key = _file_key(path)
    starts = _row_group_starts(key)
    if not 0 <= row < starts[-1]:
        raise IndexError(f"row {row} is outside {path} ({starts[-1]} rows)")
    group = bisect.bisect_right(starts, row) - 1
    return _image_bytes(_row_group_column(key, group, column)[row - starts[group]])

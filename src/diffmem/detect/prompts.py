"""Reading prompt lists (plain or labelled) and writing per-prompt score tables.

Accepted prompt files:
    ``.txt`` (or any other suffix)   one prompt per line; blank lines are skipped
    ``.csv`` / ``.tsv``              a table with a header: the ``prompt`` or ``caption`` column
                                     (or the one named by ``column``)
    ``.jsonl``                       one object per line with a ``"prompt"`` or ``"caption"`` field
    ``.parquet``                     a ``prompt`` or ``caption`` column

Score tables are written as ``.csv``, ``.jsonl`` or ``.parquet`` (by suffix; anything else is
refused).

Labelled files (JSONL or Parquet) also carry the ground truth in a ``memorized`` (bool) or
``label`` (0/1) field, or a ``kind`` field (``verbatim``/``template`` = memorized, anything else
not), as ``diffmem testbed prompts`` writes them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from diffmem.runtime.errors import PromptError

TEXT_FIELDS = ("prompt", "caption")
MEMORIZED_KINDS = ("verbatim", "template")


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise PromptError(f"prompt file {path} does not exist")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); re-encode it "
                          "as UTF-8") from e


TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")


def _records(path: Path) -> list[dict]:
    """Rows of a JSONL, CSV/TSV or Parquet file as dicts."""
    if path.suffix.lower() in (".csv", ".tsv"):
        text = _read_text(path)
        reader = csv.DictReader(text.splitlines(),
                                delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        if not reader.fieldnames:
            raise PromptError(f"{path} has no header row")
        return list(reader)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        if not path.is_file():
            raise PromptError(f"prompt file {path} does not exist")
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a bad file
            raise PromptError(f"could not read {path} as Parquet: {e}") from e
    rows = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"{path}:{n}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise PromptError(f"{path}:{n}: expected a JSON object per line")
        rows.append(row)
    return rows


def _text_of(row: dict, where: str, column: str | None = None) -> str:
    for key in (column,) if column else TEXT_FIELDS:
        if isinstance(row.get(key), str):
            return row[key]
    names = repr(column) if column else " or ".join(map(repr, TEXT_FIELDS))
    raise PromptError(f"{where}: no string field {names} (fields: {', '.join(map(str, row))}; "
                      "choose one with --column)")


TABLE_INPUTS = (".jsonl", ".parquet", ".csv", ".tsv")


def read_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """Prompts of a file, in file order: a text file by line, a table (CSV/TSV, JSONL, Parquet)
    by ``column`` (default ``prompt`` or ``caption``); blank prompts are skipped."""
    path = Path(path)
    if path.suffix.lower() in TABLE_INPUTS:
        prompts = [_text_of(r, f"{path} row {i + 1}", column)
                   for i, r in enumerate(_records(path))]
        prompts = [p for p in prompts if p.strip()]
    else:
        if column is not None:
            raise PromptError(f"{path}: --column applies to tables (.csv, .tsv, .jsonl, "
                              ".parquet); a text file holds one prompt per line")
        prompts = [ln.strip() for ln in _read_text(path).splitlines() if ln.strip()]
    if not prompts:
        raise PromptError(f"{path} contains no prompts")
    return prompts


def _label_of(row: dict, where: str) -> bool:
    for key in ("memorized", "label"):
        if key in row:
            return _flag(row[key], f"{where}: {key!r}")
    if "kind" in row:
        return row["kind"] in MEMORIZED_KINDS
    raise PromptError(f"{where}: no label (a 'memorized', 'label' or 'kind' field)")


def _flag(value: object, where: str) -> bool:
    """A 0/1 or true/false label (bool, int, float or string); anything else is a PromptError."""
    text = str(value).strip().lower()
    if text in ("1", "1.0", "true"):
        return True
    if text in ("0", "0.0", "false"):
        return False
    raise PromptError(f"{where} is {value!r}; expected 0/1 or true/false")


def read_labelled(path: str | Path) -> tuple[list[str], list[bool], list[str]]:
    """``(prompts, memorized, kinds)`` of a labelled JSONL or Parquet file."""
    path = Path(path)
    if path.suffix.lower() not in TABLE_INPUTS:
        raise PromptError(f"{path}: labelled prompts must be .jsonl, .parquet or .csv with a "
                          "'memorized', 'label' or 'kind' field")
    rows = _records(path)
    if not rows:
        raise PromptError(f"{path} contains no prompts")
    prompts, labels, kinds = [], [], []
    for i, row in enumerate(rows):
        where = f"{path} row {i + 1}"
        prompts.append(_text_of(row, where))
        labels.append(_label_of(row, where))
        kinds.append(str(row.get("kind", "memorized" if labels[-1] else "clean")))
    return prompts, labels, kinds


def write_table(columns: dict[str, Sequence], path: str | Path) -> Path:
    """Write equal-length columns as CSV, Parquet or JSONL, chosen by the file suffix (any other
    suffix: :class:`~diffmem.runtime.errors.ConfigError`, before anything is written)."""
    path = Path(path)
    if path.suffix.lower() not in TABLE_SUFFIXES:
        from diffmem.runtime.errors import ConfigError

        raise ConfigError(f"{path}: unsupported table format {path.suffix or '(no suffix)'!r}; "
                          f"use {', '.join(TABLE_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(columns)
    n = len(columns[names[0]]) if names else 0
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({k: list(v) for k, v in columns.items()}), path)
    elif path.suffix.lower() == ".jsonl":
        from diffmem.runtime.jsonio import dumps

        with path.open("w", encoding="utf-8") as f:
            for i in range(n):
                f.write(dumps({k: _plain(columns[k][i]) for k in names}) + "\n")
    else:
        with path.open("w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(names)
            for i in range(n):
                w.writerow([_plain(columns[k][i]) for k in names])
    return path


def _plain(value: object) -> object:
    return value.item() if hasattr(value, "item") else value

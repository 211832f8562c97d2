"""Prompt logs read as a stream and cut into fixed-size shards (the unit of work of a scan).

A prompt source is a ``.txt`` file (one prompt per line, blank lines skipped), a ``.jsonl`` file
(one object per line with the prompt column), a ``.parquet`` table, or a folder holding any of
them (searched recursively, sorted by path; other files are ignored). The prompts are numbered
0, 1, 2, ... across the files in that order; shard ``k`` holds prompts ``[k * S, (k + 1) * S)``.

:func:`plan_shards` reads the source once without keeping the prompts: it checks every file
(readable, UTF-8, not empty, prompt column present), counts its prompts and records where each
shard starts (a byte offset in a text file, a row in a table). :func:`read_shard` then reads one
shard's prompts from that start, so a worker reads only its own part and nothing is held in memory
but one shard.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from diffmem.runtime.errors import PromptError

PROMPT_SUFFIXES = (".txt", ".jsonl", ".parquet")
TEXT_FIELDS = ("prompt", "caption")


@dataclass(frozen=True)
class Shard:
    """Where shard ``index`` starts: file ``file`` (index into the plan's files), ``offset`` (byte
    offset of its first line, text files) or ``row`` (its first prompt's row in that file); it holds
    ``count`` prompts, numbered from ``first``."""

    index: int
    first: int
    count: int
    file: int
    offset: int
    row: int


@dataclass
class SourceFile:
    path: str
    kind: str  # "text", "jsonl" or "parquet"
    count: int
    size: int
    mtime_ns: int


@dataclass
class ShardPlan:
    """The source's files, their prompt counts and the shards; the columns used."""

    source: str
    files: list[SourceFile]
    shard_size: int
    shards: list[Shard]
    prompt_column: str | None = None
    id_column: str | None = None
    total: int = 0

    def identity(self) -> dict:
        """What a resumed scan must find unchanged: files (path, size, mtime, count), columns and
        shard size."""
        return {"source": self.source, "shard_size": self.shard_size, "total": self.total,
                "prompt_column": self.prompt_column, "id_column": self.id_column,
                "files": [asdict(f) for f in self.files]}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {**self.identity(), "shards": [asdict(s) for s in self.shards]}

    @classmethod
    def from_dict(cls, d: dict) -> ShardPlan:
        return cls(source=d["source"], files=[SourceFile(**f) for f in d["files"]],
                   shard_size=d["shard_size"], shards=[Shard(**s) for s in d["shards"]],
                   prompt_column=d["prompt_column"], id_column=d["id_column"], total=d["total"])


def source_files(source: str | Path) -> list[Path]:
    """The prompt files of a file or folder, sorted by path."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix in PROMPT_SUFFIXES)
        if not files:
            raise PromptError(f"{source} holds no prompt files ({', '.join(PROMPT_SUFFIXES)})")
        return files
    if not source.is_file():
        raise PromptError(f"prompt source {source} does not exist")
    return [source]


def _kind(path: Path) -> str:
    return {".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix, "text")


def plan_shards(source: str | Path, shard_size: int, *, prompt_column: str | None = None,
                id_column: str | None = None) -> ShardPlan:
    """Check and count the source's prompts and cut them into shards of ``shard_size``."""
    if shard_size < 1:
        raise PromptError("shard size must be >= 1")
    plan = ShardPlan(str(Path(source).resolve()), [], shard_size, [], prompt_column, id_column)
    pos = 0
    for fi, path in enumerate(source_files(source)):
        kind = _kind(path)
        offsets = _plan_parquet(path, plan) if kind == "parquet" else _plan_lines(path, kind, plan)
        n = 0
        for offset in offsets:  # offsets are streamed: only shard starts are kept
            if (pos + n) % shard_size == 0:
                plan.shards.append(Shard((pos + n) // shard_size, pos + n, 0, fi, offset, n))
            n += 1
        if n == 0:
            raise PromptError(f"{path} contains no prompts")
        st = path.stat()
        plan.files.append(SourceFile(str(path.resolve()), kind, n, st.st_size, st.st_mtime_ns))
        pos += n
    plan.total = pos
    plan.shards = [Shard(s.index, s.first, min(shard_size, pos - s.first), s.file, s.offset, s.row)
                   for s in plan.shards]
    return plan


def _plan_lines(path: Path, kind: str, plan: ShardPlan) -> Iterator[int]:
    """Byte offset of every prompt line (non-blank) of a text or JSONL file."""
    first = True
    try:
        f = path.open("rb")
    except OSError as e:
        raise PromptError(f"cannot read {path}: {e.strerror}") from e
    with f:
        offset = 0
        for n, line in enumerate(f, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PromptError(f"{path}:{n} is not UTF-8 text ({e.reason}); re-encode it as "
                                  "UTF-8") from e
            if text.strip():
                if kind == "jsonl" and first:
                    _check_json_columns(_json_row(text, path, n), path, n, plan)
                first = False
                yield offset
            offset += len(line)


def _json_row(text: str, path: Path | str, n: int) -> dict:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptError(f"{path}:{n}: not valid JSON ({e.msg})") from e
    if not isinstance(row, dict):
        raise PromptError(f"{path}:{n}: expected a JSON object per line")
    return row


def _check_json_columns(row: dict, path: Path, n: int, plan: ShardPlan) -> None:
    names = list(row)
    _prompt_column(names, path, plan)
    if plan.id_column and plan.id_column not in names:
        raise PromptError(f"{path}:{n}: no id column {plan.id_column!r}; its fields are: "
                          f"{', '.join(names)}")


def _prompt_column(names: list[str], path: Path | str, plan: ShardPlan) -> str:
    if plan.prompt_column:
        if plan.prompt_column not in names:
            raise PromptError(f"{path} has no prompt column {plan.prompt_column!r}; its columns "
                              f"are: {', '.join(names)}")
        return plan.prompt_column
    for key in TEXT_FIELDS:
        if key in names:
            return key
    raise PromptError(f"{path} has no 'prompt' or 'caption' column (its columns are: "
                      f"{', '.join(names)}); name one with --prompt-column")


def _plan_parquet(path: Path, plan: ShardPlan) -> range:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path)
        names = meta.schema_arrow.names
        n = meta.metadata.num_rows
    except Exception as e:  # pyarrow raises several types for a file that is no Parquet table
        raise PromptError(f"could not read {path} as Parquet: {e}") from e
    _prompt_column(names, path, plan)
    if plan.id_column and plan.id_column not in names:
        raise PromptError(f"{path} has no id column {plan.id_column!r}; its columns are: "
                          f"{', '.join(names)}")
    return range(n)


@dataclass
class PromptRecord:
    prompt_id: str
    prompt: str
    source: str  # "file:line" (text, JSONL; 1-based) or "file#row=N" (Parquet; 0-based)


def read_shard(plan: ShardPlan, shard: Shard) -> list[PromptRecord]:
    """The prompts of one shard, read from its start in the source files."""
    out: list[PromptRecord] = []
    fi, offset, row = shard.file, shard.offset, shard.row
    pos = shard.first
    while len(out) < shard.count:
        if fi >= len(plan.files):
            raise PromptError(f"{plan.source} has fewer prompts than when the scan was planned")
        f = plan.files[fi]
        reader = _read_parquet if f.kind == "parquet" else _read_lines
        for rec in reader(plan, f, offset, row, shard.count - len(out), pos):
            out.append(rec)
            pos += 1
        fi, offset, row = fi + 1, 0, 0
    return out


def _read_lines(plan: ShardPlan, f: SourceFile, offset: int, row: int, want: int,
                pos: int) -> Iterator[PromptRecord]:
    path = Path(f.path)
    column = None
    try:
        handle = path.open("rb")
    except OSError as e:
        raise PromptError(f"cannot read {path}: {e.strerror}") from e
    with handle:
        handle.seek(offset)
        got = 0
        for line in handle:
            if got == want:
                return
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PromptError(f"{path}: prompt {row + got + 1} is not UTF-8 text") from e
            if not text.strip():
                continue
            where = f"{path.name}:{row + got + 1}"
            if f.kind == "jsonl":
                rec = _json_row(text, path, row + got + 1)
                column = column or _prompt_column(list(rec), path, plan)
                prompt = rec.get(column)
                if not isinstance(prompt, str):
                    raise PromptError(f"{path} prompt {row + got + 1}: {column!r} is not a string")
                pid = str(rec[plan.id_column]) if plan.id_column else str(pos + got)
            else:
                prompt = text.strip()
                pid = str(pos + got)
            yield PromptRecord(pid, prompt, where)
            got += 1


def _read_parquet(plan: ShardPlan, f: SourceFile, offset: int, row: int, want: int,
                  pos: int) -> Iterator[PromptRecord]:
    """Rows ``[row, row + want)`` of a table, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    path = Path(f.path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise PromptError(f"could not read {path} as Parquet: {e}") from e
    column = _prompt_column(pf.schema_arrow.names, path, plan)
    columns = [column] + ([plan.id_column] if plan.id_column else [])
    stop = min(row + want, f.count)
    start_of_group = 0
    got = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        lo, hi = max(row, start_of_group), min(stop, start_of_group + n)
        if lo < hi:
            data = pf.read_row_group(g, columns=columns).slice(lo - start_of_group, hi - lo)
            prompts = data.column(column).to_pylist()
            ids = data.column(plan.id_column).to_pylist() if plan.id_column else None
            for j, prompt in enumerate(prompts):
                r = lo + j
                if not isinstance(prompt, str):
                    raise PromptError(f"{path} row {r}: {column!r} is not a string")
                pid = str(ids[j]) if ids is not None else str(pos + got)
                yield PromptRecord(pid, prompt, f"{path.name}#row={r}")
                got += 1
        start_of_group += n
        if start_of_group >= stop:
            break

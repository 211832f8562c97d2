"""``diffmem index build SOURCE --out INDEX --engine ray``: embed a large image source on Ray workers
and merge the shards into one index, equal to the local build
(:func:`diffmem.similarity.index.build_index_from_source`).

The source (a folder of ``x.png`` + ``x.txt`` files or a Parquet table) is cut into shards of
``shard_size`` images in the local build's order (sorted paths, table rows). Each Ray actor holds
one embedder and returns, per shard, the embeddings of its readable images with their ids, captions
and sources, and the unreadable ones apart. The driver adds the shards to one
:class:`~diffmem.similarity.index.TrainingIndex` in shard order, then switches a large one to
IVF-PQ (:meth:`~diffmem.similarity.index.TrainingIndex.optimize`) and saves it, as the local build
does: the same items in the same order, the same vectors (pixel kind: bit-identical; an embedding
model: the same up to float rounding of batch composition, since a shard's batches may group the
readable images differently from the local build's), the same ``skipped.json``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from diffmem.runtime.errors import ConfigError
from diffmem.similarity.index import TrainingIndex, _embedder_for_kind
from diffmem.similarity.index_ingest import BuildReport


def _shard_specs(source: Path, shard_size: int, image_column: str, caption_column: str,
                 id_column: str | None) -> list[dict]:
    from diffmem.similarity.sources import folder_images, iter_parquet

    if source.is_dir():
        paths = [str(p) for p in folder_images(source)]
        return [{"folder": str(source), "paths": paths[i : i + shard_size]}
                for i in range(0, len(paths), shard_size)]
    if source.suffix == ".parquet" and source.is_file():
        iter_parquet(source, image_column=image_column, caption_column=caption_column,
                     id_column=id_column)  # checks the table and its columns now
        import pyarrow.parquet as pq

        n = pq.ParquetFile(source).metadata.num_rows
        return [{"parquet": str(source), "start": i, "stop": min(i + shard_size, n),
                 "image_column": image_column, "caption_column": caption_column,
                 "id_column": id_column} for i in range(0, n, shard_size)]
    raise FileNotFoundError(f"{source} is neither a folder nor a .parquet file")


def read_source_shard(spec: dict) -> list:
    """The items (:class:`~diffmem.similarity.sources.SourceItem`) of one shard spec."""
    from diffmem.similarity.sources import folder_item, parquet_row_range

    if "folder" in spec:
        return [folder_item(spec["folder"], p) for p in spec["paths"]]
    return parquet_row_range(spec["parquet"], spec["start"], spec["stop"],
                             image_column=spec["image_column"],
                             caption_column=spec["caption_column"], id_column=spec["id_column"])


def _make_embedder(kind: str, embedder: object | None) -> object:
    return embedder if embedder is not None else _embedder_for_kind(kind)


def build_index_sharded(source: str | Path, out: str | Path, *, embedder: object | None = None,
                        kind: str = "sscd", batch_size: int = 64, shard_size: int = 1024,
                        image_column: str = "image", caption_column: str = "caption",
                        id_column: str | None = None, workers: int = 1, threads: int = 1,
                        address: str | None = None, progress: bool = False,
                        **options: object) -> BuildReport:
    """Build and save the index of ``source`` with the embedding done on Ray (see module doc).

    ``embedder`` (default: the one of ``kind``) is pickled to every worker; ``options`` go to
    :class:`~diffmem.similarity.index.TrainingIndex`.
    """
    from diffmem.scale.ray_engine import embed_on_ray

    if workers < 1 or shard_size < 1 or batch_size < 1:
        raise ConfigError("workers, shard size and batch size must be >= 1")
    specs = _shard_specs(Path(source), shard_size, image_column, caption_column, id_column)
    index = TrainingIndex(_make_embedder(kind, embedder), **options)
    skipped: list[dict] = []
    rows = [{"shard": k, "batch_size": batch_size, "spec": json.dumps(s)}
            for k, s in enumerate(specs)]
    bar = _bar(sum(len(s["paths"]) if "paths" in s else s["stop"] - s["start"] for s in specs),
               progress)
    try:
        for part in embed_on_ray(rows, functools.partial(_make_embedder, kind, embedder),
                                 read_source_shard, workers=workers, threads=threads, address=address):
            if part["ids"]:
                index.add(None, part["captions"], part["ids"],
                          embeddings=torch.from_numpy(part["vectors"]), sources=part["sources"])
            skipped.extend(part["skipped"])
            bar.update(len(part["ids"]) + len(part["skipped"]))
    finally:
        bar.close()
    index.optimize()
    out = index.save(out)
    (out / "skipped.json").write_text(json.dumps(skipped, indent=2))
    return BuildReport(out=out, count=len(index), skipped=skipped)


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="indexing", unit="img", disable=not enabled)

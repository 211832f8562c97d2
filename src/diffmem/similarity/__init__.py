"""Replication measurement: SSCD embeddings, pixel metrics, a training-set index and reports.

See ``docs/similarity.md``. Heavy dependencies (faiss, onnxruntime, onnx) are imported on use.
"""

from diffmem.similarity.index import (
    IndexMismatchError,
    PixelSpace,
    SearchResult,
    TrainingIndex,
)
from diffmem.similarity.index_ingest import BuildReport, build_index_from_source
from diffmem.similarity.metrics import (
    ReplicationMeter,
    index_self_duplication,
    max_similarity,
    replication_summary,
    self_similarity,
    self_tiled_l2,
)
from diffmem.similarity.pixel import nearest_tiled_l2, nl2, pairwise_tiled_l2, tiled_l2, to_tensor
from diffmem.similarity.report import eval_replication
from diffmem.similarity.sscd import SSCD, similarity

__all__ = [
    "SSCD",
    "BuildReport",
    "IndexMismatchError",
    "PixelSpace",
    "ReplicationMeter",
    "SearchResult",
    "TrainingIndex",
    "build_index_from_source",
    "eval_replication",
    "index_self_duplication",
    "max_similarity",
    "nearest_tiled_l2",
    "nl2",
    "pairwise_tiled_l2",
    "replication_summary",
    "self_similarity",
    "self_tiled_l2",
    "similarity",
    "tiled_l2",
    "to_tensor",
]

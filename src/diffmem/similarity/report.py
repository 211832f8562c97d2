"""Replication report for generated images (Somepalli et al., CVPR 2023; Chen et al., CVPR 2024).

:func:`eval_replication` is the library function behind
``diffmem eval replication IMAGES --index INDEX --out report.json [--grid report.html]``: it finds
each generation's nearest training image, summarises the scores with
:func:`~diffmem.similarity.metrics.replication_summary` and writes a JSON report and, optionally,
an HTML grid (generation beside its nearest training image, images embedded as base64 PNG).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from diffmem.images import to_pil
from diffmem.similarity.index import TrainingIndex
from diffmem.similarity.metrics import replication_summary
from diffmem.similarity.sources import IMAGE_SUFFIXES, decode_image

#: Default copy threshold per criterion. SSCD > 0.5 is the literature's convention; the tiled-L2
#: value (RMS difference in [-1, 1] units in the worst tile) is a diffmem choice for the testbed.
DEFAULT_THRESHOLDS = {"sscd_cosine": 0.5, "tiled_l2": 0.1}


def _image_paths(images: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(images, str | Path):
        root = Path(images)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder of images")
        return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return [Path(p) for p in images]


def _read_images(paths: list[Path]) -> tuple[list[Path], list[torch.Tensor], list[dict]]:
    ok, tensors, skipped = [], [], []
    for path in paths:
        try:
            tensors.append(decode_image(path))
            ok.append(path)
        except Exception as exc:  # unreadable generation: listed in the report, not fatal
            skipped.append({"path": str(path), "error": f"{type(exc).__name__}: {exc}"})
    return ok, tensors, skipped


def _search_all(index: TrainingIndex, images: list[torch.Tensor], batch_size: int) -> tuple:
    scores, rows, ids, captions, counts = [], [], [], [], []
    for i in range(0, len(images), batch_size):
        res = index.search(images[i : i + batch_size], k=1)
        scores.extend(res.scores[:, 0].tolist())
        rows.extend(res.indices[:, 0].tolist())
        ids.extend(r[0] for r in res.ids)
        captions.extend(r[0] for r in res.captions)
        counts.extend(r[0] for r in res.caption_counts)
    return scores, rows, ids, captions, counts


def eval_replication(images: str | Path | Sequence[str | Path], index: TrainingIndex | str | Path,
                     out_json: str | Path, *, grid_html: str | Path | None = None,
                     threshold: float | None = None, embedder: object | None = None,
                     batch_size: int = 32, max_grid: int = 100) -> dict:
    """Measure how much generated ``images`` replicate the training set behind ``index``.

    CLI: ``diffmem eval replication IMAGES --index INDEX --out report.json [--grid report.html]
    [--threshold T] [--batch-size 32] [--max-grid 100]``.

    Args:
        images: a folder of images (searched recursively) or a list of image files.
        index: a :class:`TrainingIndex` or the folder of a saved one.
        out_json: where to write the report.
        grid_html: optional HTML grid, most copy-like generations first (at most ``max_grid``).
        threshold: copy threshold; default from :data:`DEFAULT_THRESHOLDS` for the criterion.
        embedder: passed to :meth:`TrainingIndex.load` when ``index`` is a folder.

    Returns the report dict: ``memorization_rate``, ``similarity_mean``, ``similarity_p95``,
    ``criterion``, ``higher_is_better``, ``threshold``, ``n_images``, ``skipped`` (unreadable
    files with the reason) and ``per_image`` (path, score, nearest id and caption, caption count).
    """
    if not isinstance(index, TrainingIndex):
        index = TrainingIndex.load(index, embedder=embedder)
    criterion = index.embedder.criterion
    higher = index.embedder.higher_is_better
    threshold = DEFAULT_THRESHOLDS.get(criterion, 0.5) if threshold is None else threshold
    paths, tensors, skipped = _read_images(_image_paths(images))
    scores, rows, ids, captions, counts = (_search_all(index, tensors, batch_size) if tensors
                                           else ([], [], [], [], []))
    summary = replication_summary(scores, threshold=threshold, higher_is_better=higher)
    per_image = [{"path": str(p), "score": s, "nearest_id": i, "nearest_caption": c,
                  "caption_count": n} for p, s, i, c, n in zip(paths, scores, ids, captions,
                                                               counts, strict=True)]
    report = {"memorization_rate": summary["memorization_rate"],
              "similarity_mean": summary["mean"], "similarity_p95": summary["p95"],
              "criterion": criterion, "higher_is_better": higher, "threshold": threshold,
              "n_images": len(paths), "skipped": skipped, "per_image": per_image}
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if grid_html is not None:
        order = sorted(range(len(scores)), key=scores.__getitem__, reverse=higher)[:max_grid]
        write_grid_html(grid_html, [tensors[i] for i in order],
                        [index.image(rows[i]) if rows[i] >= 0 else None for i in order],
                        [per_image[i] for i in order], report)
    return report


def png_base64(image: torch.Tensor, *, max_side: int = 256) -> str:
    """A ``(3, H, W)`` image in ``[-1, 1]`` as a base64 PNG ``data:`` URI (downscaled if large)."""
    [pil] = to_pil(image[None])
    pil.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _cell(image: torch.Tensor | None) -> str:
    if image is None:
        return "<td>(training image unavailable)</td>"
    return f'<td><img src="{png_base64(image)}" width="160"></td>'


def write_grid_html(path: str | Path, generated: list[torch.Tensor],
                    nearest: list[torch.Tensor | None], rows: list[dict], report: dict) -> Path:
    """HTML table: generated image, nearest training image, score, nearest caption."""
    head = (f"<h1>Replication report</h1><p>criterion {html.escape(report['criterion'])}, "
            f"threshold {report['threshold']}, memorization rate "
            f"{report['memorization_rate']:.4f}, mean {report['similarity_mean']:.4f}, "
            f"p95 {report['similarity_p95']:.4f}, {report['n_images']} images, "
            f"{len(report['skipped'])} skipped</p>")
    body = ["<tr><th>generated</th><th>nearest training image</th><th>score</th>"
            "<th>nearest caption (repeats)</th></tr>"]
    for gen, near, row in zip(generated, nearest, rows, strict=True):
        body.append(f"<tr>{_cell(gen)}{_cell(near)}<td>{row['score']:.4f}<br>"
                    f"{html.escape(Path(row['path']).name)}</td>"
                    f"<td>{html.escape(row['nearest_caption'])} ({row['caption_count']})</td></tr>")
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>diffmem replication</title>"
           f"</head><body>{head}<table border='1'>{''.join(body)}</table></body></html>")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc, encoding="utf-8")
    return out

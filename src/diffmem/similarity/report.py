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

from diffmem.models.profile import CRITERIA, CopyCriterion
from diffmem.runtime.images import to_pil
from diffmem.similarity.index import TrainingIndex, load_index
from diffmem.similarity.metrics import replication_summary
from diffmem.similarity.sources import IMAGE_SUFFIXES, decode_image

#: Default copy threshold per criterion, read from the copy criteria of
#: :data:`diffmem.models.profile.CRITERIA` (the one place they are set): SSCD > 0.5 is the
#: literature's convention; tiled L2 (RMS difference in [-1, 1] units in the worst tile) < 0.15 is
#: the testbed's replication threshold (docs/testbed.md gives its measured trade-off).
DEFAULT_THRESHOLDS = {name: CRITERIA.get(name).threshold for name in CRITERIA}


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
    listed = _image_paths(images)
    if not listed:
        from diffmem.runtime.errors import EmptyInputError

        raise EmptyInputError(f"{images} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    index = load_index(index, what="eval replication", embedder=embedder,
                       missing="eval replication needs the training set's index (--index IDX; "
                               "build it with `diffmem index build`)")
    criterion = index.embedder.criterion
    higher = index.embedder.higher_is_better
    threshold = CRITERIA.get(criterion).threshold if threshold is None else threshold
    paths, tensors, skipped = _read_images(listed)
    if not paths:
        from diffmem.runtime.errors import EmptyInputError

        raise EmptyInputError(f"{images}: none of its {len(skipped)} image(s) could be read "
                              f"(first: {skipped[0]['path']}: {skipped[0]['error']})")
    prompts = _prompts_of(paths)
    scores, rows, ids, captions, counts = (_search_all(index, tensors, batch_size) if tensors
                                           else ([], [], [], [], []))
    summary = replication_summary(scores, threshold=threshold, higher_is_better=higher)
    rule = CopyCriterion(criterion, threshold, higher_is_copy=higher)
    per_image = [{"path": str(p), "prompt": prompts.get(str(p)), "score": s,
                  "copy": rule.is_copy(s),
                  "nearest_id": i, "nearest_caption": c, "caption_count": n}
                 for p, s, i, c, n in zip(paths, scores, ids, captions, counts, strict=True)]
    # the copy-like tail: the 95th percentile of a similarity, the 5th of a distance
    tail = 95 if higher else 5
    report = {"memorization_rate": summary["memorization_rate"],
              "similarity_mean": summary["mean"], "similarity_p95": summary["p95"],
              "copy_tail_percentile": tail,
              "criterion": criterion, "higher_is_better": higher, "threshold": threshold,
              "copy_rule": f"score {'>' if higher else '<'} {threshold:g}",
              "n_images": len(paths), "skipped": skipped, "per_image": per_image}
    if not higher:  # 'p95' of a distance is its 5th percentile: say so under its own name
        report["distance_p5"] = report.pop("similarity_p95")
        report["distance_mean"] = report.pop("similarity_mean")
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    from diffmem.runtime.jsonio import write_json

    write_json(out, report)
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


def _prompts_of(paths: list[Path]) -> dict[str, str]:
    """The prompt of each generated image: from the ``generations.jsonl`` of its folder (as
    ``diffmem generate`` writes it) or its ``x.txt`` caption file."""
    out: dict[str, str] = {}
    listings: dict[Path, dict[str, str]] = {}
    for p in paths:
        folder = p.parent
        if folder not in listings:
            listings[folder] = {}
            f = folder / "generations.jsonl"
            if f.is_file():
                for line in f.read_text(encoding="utf-8").splitlines():
                    try:
                        row = json.loads(line)
                        listings[folder][row["file"]] = row["prompt"]
                    except (ValueError, KeyError, TypeError):
                        continue
        prompt = listings[folder].get(p.name)
        if prompt is None and p.with_suffix(".txt").is_file():
            prompt = p.with_suffix(".txt").read_text(encoding="utf-8").strip()
        if prompt is not None:
            out[str(p)] = prompt
    return out


def _cell(image: torch.Tensor | None) -> str:
    if image is None:
        return "<td>(training image unavailable)</td>"
    return f'<td><img src="{png_base64(image)}" width="160"></td>'


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:70em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em}
.summary{background:#f5f5f5;border-radius:6px;padding:.6em 1em;line-height:1.6}
.summary b{font-size:1.1em}
table{border-collapse:collapse;width:100%;margin-top:1em}
th,td{border-bottom:1px solid #ddd;padding:.4em .6em;text-align:left;vertical-align:top}
th{background:#fafafa;position:sticky;top:0}
tr.copy{background:#fde8e8}
tr.copy td.verdict{color:#b00020;font-weight:bold}
td.verdict{color:#1b5e20}
td.prompt{max-width:18em}
td img{image-rendering:pixelated;border:1px solid #ccc}
.small{color:#666;font-size:.9em}
"""


def write_grid_html(path: str | Path, generated: list[torch.Tensor],
                    nearest: list[torch.Tensor | None], rows: list[dict], report: dict) -> Path:
    """HTML report: the criterion, threshold and rates at the top; then per generation its prompt,
    the image beside its nearest training image, the score and the verdict (copies marked red),
    most copy-like first."""
    higher = report["higher_is_better"]
    tail = report.get("copy_tail_percentile", 95 if higher else 5)
    tail_value = report.get("similarity_p95", report.get("distance_p5"))
    mean = report.get("similarity_mean", report.get("distance_mean"))
    kind = "similarity" if higher else "distance"
    rate = report["memorization_rate"]
    n_copies = sum(1 for r in rows if r.get("copy"))
    head = (
        "<h1>Replication report</h1><div class='summary'>"
        f"<b>{'—' if rate is None else f'{100 * rate:.1f}%'}</b> of {report['n_images']} "
        f"generated images are copies of a training image "
        f"(<b>{n_copies}</b> of those listed below, marked "
        f"<span style='color:#b00020'>COPY</span>)."
        f"<br>criterion: <b>{html.escape(report['criterion'])}</b> ({kind}; "
        f"{'higher' if higher else 'lower'} = more alike); a generation is a copy when "
        f"<b>{html.escape(report.get('copy_rule', ''))}</b>"
        f"<br>mean {kind} {_fmt(mean)}; {tail}th percentile (the most copy-like "
        f"{100 - tail if higher else tail}%) {_fmt(tail_value)}; "
        f"{len(report['skipped'])} unreadable file(s) skipped</div>")
    body = ["<tr><th>#</th><th>prompt</th><th>generated</th><th>nearest training image</th>"
            f"<th>{kind}</th><th>verdict</th><th>nearest training caption (copies)</th></tr>"]
    for k, (gen, near, row) in enumerate(zip(generated, nearest, rows, strict=True), 1):
        copy = bool(row.get("copy"))
        prompt = row.get("prompt")
        body.append(
            f"<tr class='{'copy' if copy else 'novel'}'><td>{k}</td>"
            f"<td class='prompt'>{html.escape(prompt) if prompt else '<i>(unknown)</i>'}"
            f"<br><span class='small'>{html.escape(Path(row['path']).name)}</span></td>"
            f"{_cell(gen)}{_cell(near)}<td>{row['score']:.4f}</td>"
            f"<td class='verdict'>{'COPY' if copy else 'novel'}</td>"
            f"<td>{html.escape(str(row['nearest_caption']))} ({row['caption_count']})<br>"
            f"<span class='small'>{html.escape(str(row['nearest_id']))}</span></td></tr>")
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>diffmem replication</title>"
           f"<style>{_STYLE}</style></head><body>{head}<table>{''.join(body)}</table>"
           "</body></html>")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc, encoding="utf-8")
    return out


def _fmt(x: float | None) -> str:
    return "—" if x is None or x != x else f"{x:.4f}"

"""The decision of a scan (:mod:`diffmem.scale.scan`): by generation with the training index, else
the detector's estimate.

With an index (``diffmem scan --index IDX``, or the one ``diffmem calibrate --index`` stored for
the model's weights), every prompt's ``decision`` is the verdict of
:class:`~diffmem.detect.verdict.GenerationJudge` (the ``preview_replication`` detector: 4 previews
of 20 steps searched in the index; it copies when its closest preview crosses the model's copy
criterion), the same for every detector row of the prompt; the detector's ``score`` against its
``threshold`` stays as the fast first estimate (column ``estimate``). Without an index the
decision is that estimate. Column ``verdict_source`` says which decided: ``"generation"`` or
``"estimate"`` (null: no decision, neither a threshold nor an index); ``verdict`` holds the
generation verdict as JSON (closest preview's similarity, criterion, nearest training item).

The index is checked against the model in the driver before anything is written
(:meth:`GenerationJudge.check`: another model's index is one ConfigError, never a fall-back to the
estimate), and it is part of the scan's identity (:func:`verdict_identity`), so a resumed scan with
another index, or without one, is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

GENERATION = "generation"
ESTIMATE = "estimate"

#: the columns this module adds to a shard, after ``decision``
COLUMNS = ("estimate", "verdict_source", "verdict")


def plan_verdict(index, adapter: Callable[[], object], *, generations: int, steps: int, seed: int,
                 guidance_scale: float, batch_size: int) -> dict | None:
    """The verdict settings of a scan job (None without ``index``), after checking in the driver
    that ``index`` (a folder) holds the training set of the model ``adapter()``."""
    if index is None:
        return None
    from diffmem.runtime.errors import ConfigError

    if not isinstance(index, (str, Path)):
        raise ConfigError("scan --index: give the index's folder (the workers open it)")
    spec = {"index": str(Path(index).resolve()), "generations": generations,
            "num_inference_steps": steps, "seed": seed, "guidance_scale": guidance_scale,
            "batch_size": batch_size}
    judge = make_judge(spec)
    judge.check(adapter(), who="scan --index")
    spec["settings"] = judge.settings()
    return spec


def make_judge(spec: dict | None):
    """The :class:`GenerationJudge` of a job's verdict settings (None: no index)."""
    if spec is None:
        return None
    from diffmem.detect.verdict import GenerationJudge

    return GenerationJudge(spec["index"], generations=spec["generations"],
                           num_inference_steps=spec["num_inference_steps"], seed=spec["seed"],
                           guidance_scale=spec["guidance_scale"], batch_size=spec["batch_size"])


def verdict_identity(spec: dict | None) -> dict | None:
    """What a resumed scan must match of the verdict: the index (its folder and a hash of its
    ``meta.json`` and of the size and first MiB of its item table) and the judge's settings."""
    if spec is None:
        return None
    h = hashlib.sha256()
    for name in ("meta.json", "items.parquet"):
        path = Path(spec["index"]) / name
        if path.is_file():
            h.update(f"{name}\0{path.stat().st_size}\0".encode())
            with path.open("rb") as f:
                h.update(f.read(1 << 20))
    return {"index": spec["index"], "index_sha256": h.hexdigest()[:20],
            "settings": spec["settings"], "guidance_scale": spec["guidance_scale"]}


def decide(scores, threshold: float | None, verdicts) -> tuple[list, list, list, list]:
    """``(decision, estimate, verdict_source, verdict)`` columns of one detector's rows: the
    estimate is ``score > threshold`` (None without one); the decision is the generation verdict
    when there is one (``verdicts``: :class:`~diffmem.detect.verdict.CopyVerdict` per prompt),
    else the estimate."""
    estimate = [None if threshold is None else bool(s > threshold) for s in scores]
    if verdicts is None:
        source = None if threshold is None else ESTIMATE
        return list(estimate), estimate, [source] * len(estimate), [None] * len(estimate)
    return ([bool(v.copies) for v in verdicts], estimate, [GENERATION] * len(verdicts),
            [json.dumps(v.to_dict(), sort_keys=True) for v in verdicts])


def verdict_summary(spec: dict | None, thresholds: dict, origin: str | None) -> dict:
    """The summary's ``verdict``: what decided, and what the estimate is."""
    from diffmem.detect.verdict import ESTIMATE_NOTE

    if spec is not None:
        s = spec["settings"]
        return {"source": GENERATION, "index": spec["index"], "index_origin": origin or "given",
                "method": f"{s['generations']} previews of {s['num_inference_steps']} steps "
                          f"searched in the training index ({s['criterion']}, copy threshold "
                          f"{s['copy_threshold']:g})",
                "estimate": "each detector's score against its threshold, kept as a fast first "
                            "estimate (column 'estimate')"}
    if all(v is None for v in thresholds.values()):
        return {"source": None, "note": "no decision: no threshold and no training index "
                                        "(--threshold, --threshold-from, `diffmem calibrate`, or "
                                        "--index IDX)"}
    return {"source": ESTIMATE, "note": ESTIMATE_NOTE}

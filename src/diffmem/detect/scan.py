"""Score a prompt file with a detector (the function behind ``diffmem detect``)."""

from __future__ import annotations

from pathlib import Path

from diffmem.core.steps import parse_steps
from diffmem.detect.calibration import calibrated_threshold
from diffmem.detect.prompts import TABLE_SUFFIXES, read_prompts, write_table
from diffmem.detect.registry import make_detector
from diffmem.models.adapter import ModelAdapter, load_adapter
from diffmem.runtime.defaults import SAMPLING


def detect_file(prompts_file: str | Path, out: str | Path, *,
                model: str | Path | ModelAdapter = "testbed",
                detector: str | None = None, steps: int | str | None = None,
                generations: int | None = None,
                threshold_from: str | Path | None = None, fpr: float = 0.01,
                num_inference_steps: int | None = None, guidance_scale: float = SAMPLING.guidance_scale,
                scheduler: str | None = None, batch_size: int = 16, seed: int = 0,
                seed_mode: str = "per-generation", column: str | None = None,
                index=None) -> dict:
    """Score every prompt of ``prompts_file`` and write ``prompt, score, truncated[, flagged]`` to
    ``out`` (``.csv``, ``.jsonl`` or ``.parquet``).

    ``truncated``: the prompt was longer than the text encoder's context and only its first tokens
    were scored. With ``threshold_from`` (a file of clean prompts) the detector is first calibrated
    at ``fpr`` and each prompt gets ``flagged = score > threshold``; without it, so does a threshold
    stored for these weights and detector settings (``diffmem calibrate``; the testbed's held-out
    calibration), and nothing is fitted. ``detector``: a registry name
    (default: ``preview_replication`` with an ``index``, the training set's, else
    :data:`~diffmem.runtime.defaults.DEFAULT_DETECTOR`); ``num_inference_steps``: the detector's own
    schedule length when None. Returns a summary dict.
    """
    import warnings

    from diffmem.models.adapter import TruncationWarning, quiet_truncation

    if Path(out).suffix.lower() not in TABLE_SUFFIXES:  # refuse before the work
        write_table({}, out)
    prompts = read_prompts(prompts_file, column)
    clean = read_prompts(threshold_from, column) if threshold_from is not None else None
    det = make_detector(detector, index=index, steps=parse_steps(steps),
                        generations=generations, fpr=fpr,
                        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        scheduler=scheduler, batch_size=batch_size, seed=seed,
                        seed_mode=_mode(seed_mode))
    adapter = load_adapter(model, scheduler=scheduler)
    with quiet_truncation():  # one summary below instead of one warning per batch
        truncated = adapter.tokenize(prompts).truncated
    if any(truncated):
        warnings.warn(f"{sum(truncated)} of {len(prompts)} prompt(s) exceed the text encoder's "
                      f"{adapter.max_length} tokens; only their first tokens are scored "
                      "(column 'truncated')", TruncationWarning, stacklevel=2)
    with quiet_truncation():
        scores = det.score(adapter, prompts)
    columns: dict = {"prompt": prompts, "score": [float(s) for s in scores],
                     "truncated": truncated}
    summary: dict = {"detector": det.name, "n_prompts": len(prompts),
                     "n_truncated": int(sum(truncated)), "out": str(out)}
    stored = None
    if clean is None and det.scores_are_copy_margins:  # a verdict by generation
        columns["flagged"] = [bool(float(s) > 0) for s in scores]
        summary.update(threshold=0.0, n_flagged=int(sum(columns["flagged"])),
                       verdict="generation: previews searched in the training index, flagged "
                               "when they copy by its criterion")
        write_table(columns, out)
        return summary
    if clean is None:  # a threshold stored for these weights and settings (`diffmem calibrate`)
        stored = calibrated_threshold(adapter, det, fit=False)
    if clean is not None or stored is not None:
        if clean is not None:
            with quiet_truncation():
                det.fit(adapter, clean)
        columns["flagged"] = [bool(f) for f in det.decision_function(scores) > 0]
        summary.update(threshold=det.threshold_, n_flagged=int(sum(columns["flagged"])),
                       n_calibration=det.n_calibration_)
        if clean is None:
            summary["calibration"] = "stored"
    write_table(columns, out)
    return summary


def _mode(seed_mode: str) -> str | None:
    """``seed_mode`` for :func:`make_detector`; the default is left to the detector (None), so a
    detector class that predates seed modes still builds."""
    return None if seed_mode in (None, "per-generation", "per_generation") else seed_mode

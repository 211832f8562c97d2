"""Score a prompt file with a detector (the function behind ``diffmem detect``)."""

from __future__ import annotations

from pathlib import Path

from diffmem.detect.prompts import read_prompts, write_table
from diffmem.detect.registry import DEFAULT_DETECTOR, make_detector, parse_steps
from diffmem.models.adapter import ModelAdapter, load_adapter


def detect_file(prompts_file: str | Path, out: str | Path, *,
                model: str | Path | ModelAdapter = "testbed",
                detector: str = DEFAULT_DETECTOR, steps: int | str | None = None,
                generations: int | None = None,
                threshold_from: str | Path | None = None, fpr: float = 0.01,
                num_inference_steps: int = 50, guidance_scale: float = 7.5,
                scheduler: str | None = None, batch_size: int = 16, seed: int = 0) -> dict:
    """Score every prompt of ``prompts_file`` and write ``prompt, score[, flagged]`` to ``out``.

    With ``threshold_from`` (a file of clean prompts) the detector is first calibrated at ``fpr``
    and each prompt gets ``flagged = score > threshold``. Returns a summary dict.
    """
    prompts = read_prompts(prompts_file)
    clean = read_prompts(threshold_from) if threshold_from is not None else None
    det = make_detector(detector, steps=parse_steps(steps), generations=generations, fpr=fpr,
                        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        scheduler=scheduler, batch_size=batch_size, seed=seed)
    adapter = load_adapter(model, scheduler=scheduler)
    scores = det.score(adapter, prompts)
    columns: dict = {"prompt": prompts, "score": [float(s) for s in scores]}
    summary: dict = {"detector": det.name, "n_prompts": len(prompts), "out": str(out)}
    if clean is not None:
        det.fit(adapter, clean)
        columns["flagged"] = [bool(f) for f in det.decision_function(scores) > 0]
        summary.update(threshold=det.threshold_, n_flagged=int(sum(columns["flagged"])),
                       n_calibration=det.n_calibration_)
    write_table(columns, out)
    return summary

"""Evaluation of a detector on labelled prompts (the function behind ``diffmem eval detection``).

Positives are memorized prompts (testbed kinds ``verbatim`` and ``template``), negatives the rest
(``heldout``). Reports ROC AUC and TPR at 1% and 3% FPR (see :mod:`diffmem.eval.metrics` for the
convention), and writes the ROC curve as a PNG and the per-prompt scores as CSV beside the report.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffmem.detect.base import Detector
from diffmem.detect.prompts import read_labelled, write_table
from diffmem.detect.registry import make_detector, parse_steps
from diffmem.errors import PromptError
from diffmem.eval.metrics import operating_point, roc_auc_score, roc_curve, tpr_at_fpr
from diffmem.models.adapter import ModelAdapter, load_adapter


def labelled_testbed_prompts(model: str | Path | ModelAdapter | None = "testbed"
                             ) -> tuple[list[str], list[bool], list[str]]:
    """``(prompts, memorized, kinds)`` of a testbed model's labelled evaluation prompts (``None``:
    the shipped testbed's, without loading it). A model that is no testbed has no labelled prompts:
    :class:`~diffmem.errors.ConfigError`."""
    from diffmem.testbed import labelled_prompts, shipped_testbed_spec

    if model is None:
        spec, folder = shipped_testbed_spec(), None
    else:
        adapter = load_adapter(model)
        spec, folder = adapter.require_testbed_spec(
            "evaluating detection without --prompts (the testbed's labelled prompts)"), adapter.path
    prompts = labelled_prompts(spec, folder)
    return [p.prompt for p in prompts], [p.memorized for p in prompts], [p.kind for p in prompts]


def detection_metrics(memorized: Sequence[bool], scores: Sequence[float]) -> dict:
    """AUC, TPR at 1% and 3% FPR and class counts; one clear error when AUC is undefined."""
    y = np.asarray(memorized, dtype=int)
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    if n_pos == 0 or n_neg == 0:
        only = "memorized" if n_pos else "non-memorized"
        raise PromptError(f"all {y.size} labelled prompts are {only}; AUC and TPR at FPR need "
                          "both memorized and non-memorized prompts")
    return {
        "auc": roc_auc_score(y, scores),
        "tpr_at_1pct_fpr": tpr_at_fpr(y, scores, 0.01),
        "tpr_at_3pct_fpr": tpr_at_fpr(y, scores, 0.03),
        "tpr_at_fpr_rule": TPR_AT_FPR_RULE,
        # Wen et al.'s detect_mem.py reads the largest FPR strictly below f
        "tpr_at_1pct_fpr_strict": tpr_at_fpr(y, scores, 0.01, strict=True),
        "tpr_at_3pct_fpr_strict": tpr_at_fpr(y, scores, 0.03, strict=True),
        "n_positive": n_pos,
        "n_negative": n_neg,
    }


#: How ``tpr_at_*_fpr`` is read off the ROC curve (stated in every report).
TPR_AT_FPR_RULE = ("TPR at the ROC point with the largest FPR <= f (the *_strict values: "
                   "largest FPR < f, the convention of Wen et al.'s reference detect_mem.py)")


def plot_roc(memorized: Sequence[bool], scores: Sequence[float], path: str | Path, *,
             title: str = "", fprs: Sequence[float] = (0.01,)) -> Path:
    """Save the ROC curve (linear axes, chance diagonal, AUC in the legend) as a PNG, with the
    operating point of the threshold that each target FPR in ``fprs`` calls for (the point the
    report's TPR at that FPR is read from) marked and labelled with its threshold."""
    from matplotlib.figure import Figure  # no pyplot: the user's backend is left alone

    fpr, tpr, _ = roc_curve(memorized, scores)
    auc = roc_auc_score(memorized, scores)
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.subplots()
    ax.plot(fpr, tpr, drawstyle="steps-post", label=f"AUC = {auc:.3f}")
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=0.8)
    for target, colour in zip(fprs, ("tab:red", "tab:orange", "tab:green"), strict=False):
        f, t, thr = operating_point(memorized, scores, target)
        if f == f:  # not NaN
            ax.plot([f], [t], "o", color=colour, markersize=8, zorder=3, clip_on=False,
                    label=f"threshold {thr:.3g} (target FPR {100 * target:g}%):\n"
                          f"FPR {f:.3f}, TPR {t:.3f}")
            ax.axvline(target, color=colour, linewidth=0.6, linestyle=":")
    ax.set(xlabel="false-positive rate (non-memorized)", ylabel="true-positive rate (memorized)",
           xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def evaluate_detection(detector: str | Detector = "noise_magnitude", *,
                       model: str | Path | ModelAdapter = "testbed",
                       prompts: str | Path | None = None, out: str | Path | None = None,
                       steps: int | str | None = None, generations: int = 1,
                       num_inference_steps: int = 50, guidance_scale: float = 7.5,
                       scheduler: str | None = None, batch_size: int = 16,
                       seed: int = 0, seed_mode: str = "per-generation") -> dict:
    """Score labelled prompts and report detection metrics.

    ``prompts``: a labelled JSONL/Parquet file, or ``None`` for the testbed's labelled prompts.
    ``detector``: a registry name (then ``steps``/``generations``/... configure it) or an instance.
    With ``out`` (``report.json``) also writes ``report_roc.png`` and ``report_scores.csv``.
    """
    adapter = None
    if prompts is None:  # the model must be a testbed: ask its adapter for the data spec
        adapter = load_adapter(model, scheduler=scheduler)
        texts, labels, kinds = labelled_testbed_prompts(adapter)
    else:  # a bad prompt file fails before the model loads
        texts, labels, kinds = read_labelled(prompts)
    y = np.asarray(labels, dtype=int)
    if y.sum() in (0, y.size):  # fail before the (slow) scoring
        detection_metrics(labels, np.zeros(len(labels)))
    if isinstance(detector, str):
        det = make_detector(detector, steps=parse_steps(steps), generations=generations,
                            num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale, scheduler=scheduler,
                            batch_size=batch_size, seed=seed, seed_mode=_mode(seed_mode))
    else:
        det = detector
    if adapter is None:
        adapter = load_adapter(model, scheduler=scheduler)
    t0 = time.perf_counter()
    scores = det.score(adapter, texts)
    seconds = time.perf_counter() - t0
    report = {
        "detector": det.name,
        "steps": det.steps,
        "generations": det.generations,
        "num_inference_steps": det.num_inference_steps,
        **detection_metrics(labels, scores),
        "seconds": round(seconds, 3),
        "prompts": str(prompts) if prompts is not None else "testbed",
    }
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        stem = out.with_suffix("")
        roc = plot_roc(labels, scores, f"{stem}_roc.png",
                       title=f"{det.name}, steps={det.steps}, gens={det.generations}")
        table = write_table({"prompt": texts, "kind": kinds, "memorized": list(labels),
                             "score": [float(s) for s in scores]}, f"{stem}_scores.csv")
        report.update(roc_png=str(roc), scores_csv=str(table))
        from diffmem.clitools import write_json

        write_json(out, report)
    return report


def _mode(seed_mode: str) -> str | None:
    """``seed_mode`` for :func:`make_detector`; the default is left to the detector (None), so a
    detector class that predates seed modes still builds."""
    return None if seed_mode in (None, "per-generation", "per_generation") else seed_mode

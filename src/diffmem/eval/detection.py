"""Evaluation of a detector on labelled prompts (the function behind ``diffmem eval detection``).

Default prompts: the testbed's broad set labelled by generation (``src/diffmem/testbed/
broad_labels.jsonl``, :mod:`diffmem.testbed.broad`): positives are prompts that copied a training
image in at least one of 4 seeds, negatives the rest, whatever group built them. ``prompts=
"designed"`` takes the 92 prompts labelled by construction instead (``verbatim``/``template`` =
memorized, ``heldout`` = clean).

Reports ROC AUC and TPR at 1% and 3% FPR overall (see :mod:`diffmem.eval.metrics` for the
convention); per group (each group's copying prompts against ALL clean prompts, so that a group of
near-only copies still has an AUC), per split and, for labels of the graded testbed, per training
duplicate count of the item a prompt was derived from (``duplicates``, the same metrics as a
group); a threshold calibrated at ``fpr`` on the clean controls (group ``clean``, the ones that do
not copy; all negatives when a file has no such group) with the TPR and FPR it gives overall and
per group; and the cost, measured: UNet rows evaluated
per prompt (a row = one latent through the UNet; a Jacobian-vector product counts its rows once,
at 2-3 times a row's cost) and seconds per prompt. Writes the ROC curve as a PNG and the per-prompt
scores as CSV beside the report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffmem.core.steps import parse_steps
from diffmem.detect.base import Detector
from diffmem.detect.prompts import read_labelled, write_table
from diffmem.detect.registry import make_detector
from diffmem.eval.metrics import operating_point, roc_auc_score, roc_curve, tpr_at_fpr
from diffmem.models.adapter import ModelAdapter, load_adapter
from diffmem.models.calibration import threshold_at_fpr
from diffmem.runtime.defaults import SAMPLING
from diffmem.runtime.errors import PromptError
from diffmem.testbed import require_spec


def labelled_rows(prompts: str | Path | None, model: str | Path | ModelAdapter = "testbed"
                  ) -> tuple[list[str], np.ndarray, list[str], list[str], str]:
    """``(prompts, memorized, groups, splits, source)`` of a labelled set.

    ``prompts``: ``None`` (the shipped broad labels for the shipped testbed, else the designed
    prompts of the model's testbed spec), ``"broad"``, ``"designed"`` or a labelled JSONL/Parquet
    file (a ``group`` field, else its ``kind``, names the groups).
    """
    from diffmem.testbed import labels_of
    from diffmem.testbed.broad import read_broad_labels

    labels = labels_of(model)
    if prompts is None:
        prompts = "broad" if labels is not None else "designed"
    if str(prompts) == "designed":
        texts, labels, kinds = labelled_testbed_prompts(model)
        return texts, np.asarray(labels, bool), kinds, ["all"] * len(texts), "designed"
    if str(prompts) == "broad":
        rows, source = read_broad_labels(labels), str(labels)
    elif Path(prompts).suffix == ".jsonl" and _has_group(Path(prompts)):
        rows, source = read_broad_labels(prompts), str(prompts)
    else:
        texts, labels, kinds = read_labelled(prompts)
        return texts, np.asarray(labels, bool), kinds, ["all"] * len(texts), str(prompts)
    return ([r["prompt"] for r in rows], np.array([bool(r["memorized"]) for r in rows]),
            [r["group"] for r in rows], [r.get("split", "all") for r in rows], source)


def labelled_duplicates(prompts: str | Path | None, model: str | Path | ModelAdapter = "testbed"
                        ) -> list[int] | None:
    """The ``duplicates`` (training copies of the source item; 0: clean controls) of each row of
    the labelled set :func:`labelled_rows` reads, when its rows carry them (the graded testbed's
    broad labels), else ``None``."""
    from diffmem.testbed import labels_of
    from diffmem.testbed.broad import read_broad_labels

    if prompts is None or str(prompts) == "broad":
        path = labels_of(model)
        if path is None or str(prompts or "broad") != "broad":
            return None
    elif Path(prompts).suffix == ".jsonl" and _has_group(Path(prompts)):
        path = Path(prompts)
    else:
        return None
    rows = read_broad_labels(path)
    if not any(r.get("duplicates") is not None for r in rows):
        return None
    return [int(r.get("duplicates") or 0) for r in rows]


def _has_group(path: Path) -> bool:
    from diffmem.detect.prompts import _read_text

    first = next((ln for ln in _read_text(path).splitlines() if ln.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(row, dict) and "group" in row and "memorized" in row


def labelled_testbed_prompts(model: str | Path | ModelAdapter | None = "testbed"
                             ) -> tuple[list[str], list[bool], list[str]]:
    """``(prompts, memorized, kinds)`` of a testbed model's designed evaluation prompts (``None``:
    the shipped testbed's, without loading it). A model that is no testbed has no labelled prompts:
    :class:`~diffmem.runtime.errors.ConfigError`."""
    from diffmem.testbed import labelled_prompts, shipped_testbed_spec

    if model is None:
        spec, folder = shipped_testbed_spec(), None
    else:
        adapter = load_adapter(model)
        spec, folder = require_spec(adapter,
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


def grouped_metrics(memorized: Sequence[bool], scores: Sequence[float], groups: Sequence[str],
                    threshold: float | None = None) -> dict[str, dict]:
    """Per group: counts, AUC and TPR at 1% FPR of the group's copying prompts against ALL clean
    prompts of the set, and (with ``threshold``) the share of the group's copying prompts flagged
    (``tpr_at_threshold``) and of its clean prompts flagged (``fpr_at_threshold``)."""
    y = np.asarray(memorized, bool)
    s = np.asarray(scores, float)
    g = np.asarray(groups)
    out: dict[str, dict] = {}
    for name in dict.fromkeys(groups):
        in_g = g == name
        pos, neg = in_g & y, in_g & ~y
        d: dict = {"n": int(in_g.sum()), "n_copying": int(pos.sum()), "n_clean": int(neg.sum())}
        if pos.any() and (~y).any():
            rows = pos | ~y
            d["auc"] = roc_auc_score(y[rows], s[rows])
            d["tpr_at_1pct_fpr"] = tpr_at_fpr(y[rows], s[rows], 0.01)
        if threshold is not None:
            if pos.any():
                d["tpr_at_threshold"] = float((s[pos] > threshold).mean())
            if neg.any():
                d["fpr_at_threshold"] = float((s[neg] > threshold).mean())
        out[str(name)] = d
    return out


def calibration_rows(memorized: Sequence[bool], groups: Sequence[str]) -> np.ndarray:
    """Which prompts a threshold is calibrated on: the clean controls that do not copy (group
    ``clean``), or every clean prompt when there is no such group."""
    y = np.asarray(memorized, bool)
    g = np.asarray(groups)
    rows = (g == "clean") & ~y
    return rows if rows.any() else ~y


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


def evaluate_detection(detector: str | Detector | None = None, *,
                       model: str | Path | ModelAdapter = "testbed",
                       prompts: str | Path | None = None, out: str | Path | None = None,
                       steps: int | str | None = None, generations: int | None = None,
                       num_inference_steps: int | None = None,
                       guidance_scale: float = SAMPLING.guidance_scale,
                       scheduler: str | None = None, batch_size: int = 16,
                       seed: int = 0, fpr: float = 0.01, split: str | None = None,
                       seed_mode: str = "per-generation", index=None) -> dict:
    """Score labelled prompts and report detection metrics, overall, per group and per split.

    ``prompts``: see :func:`labelled_rows` (default: the broad generation-labelled set).
    ``detector``: a registry name (then ``steps``/``generations``/... configure it) or an instance;
    default: ``preview_replication`` with an ``index`` (the training set's), else
    :data:`~diffmem.runtime.defaults.DEFAULT_DETECTOR`. ``num_inference_steps``: None = the detector's own.
    ``split``: only the prompts of that split (``dev`` / ``test``). With ``out`` (``report.json``)
    also writes ``report_roc.png`` and ``report_scores.csv``.
    """
    adapter = None
    if prompts is None:  # the model must be a testbed: ask its adapter for the data spec
        adapter = load_adapter(model, scheduler=scheduler)
    texts, labels, kinds, splits, source = labelled_rows(prompts, adapter or model)
    dups = labelled_duplicates(prompts, adapter or model)
    if split is not None:
        keep = [i for i, sp in enumerate(splits) if sp == split]
        if not keep:
            raise PromptError(f"no prompts of split {split!r} in {source}")
        texts, labels = [texts[i] for i in keep], labels[keep]
        kinds, splits = [kinds[i] for i in keep], [splits[i] for i in keep]
        dups = None if dups is None else [dups[i] for i in keep]
    y = np.asarray(labels, dtype=int)
    if y.sum() in (0, y.size):  # fail before the (slow) scoring
        detection_metrics(labels, np.zeros(len(labels)))
    if detector is None or isinstance(detector, str):
        det = make_detector(detector, index=index, steps=parse_steps(steps),
                            generations=generations,
                            num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale, scheduler=scheduler,
                            batch_size=batch_size, seed=seed, seed_mode=_mode(seed_mode))
    else:
        det = detector
    if adapter is None:
        adapter = load_adapter(model, scheduler=scheduler)
    rows = [0]

    def count(_module, args, kwargs):
        x = args[0] if args else kwargs.get("sample")
        rows[0] += int(x.shape[0])

    handle = adapter.unet.register_forward_pre_hook(count, with_kwargs=True)
    t0 = time.perf_counter()
    try:
        scores = np.asarray(det.score(adapter, texts), dtype=float)
    finally:
        handle.remove()
    seconds = time.perf_counter() - t0
    calib = calibration_rows(labels, kinds)
    threshold = threshold_at_fpr(scores[calib], fpr)
    flagged = scores > threshold
    report = {
        "detector": det.name,
        "steps": det.steps,
        "generations": det.generations,
        "num_inference_steps": det.num_inference_steps,
        **detection_metrics(labels, scores),
        "threshold": threshold,
        "threshold_fpr": fpr,
        "n_calibration": int(calib.sum()),
        "tpr_at_threshold": float(flagged[labels].mean()) if labels.any() else float("nan"),
        "fpr_at_threshold": float(flagged[~labels].mean()) if (~labels).any() else float("nan"),
        "unet_rows_per_prompt": rows[0] / len(texts),
        "seconds_per_prompt": round(seconds / len(texts), 4),
        "seconds": round(seconds, 3),
        "prompts": source,
        "split": split or "all",
        "groups": grouped_metrics(labels, scores, kinds, threshold),
    }
    if dups is not None:  # per training duplicate count (0: the clean controls)
        per = grouped_metrics(labels, scores, [str(d) for d in dups], threshold)
        report["duplicates"] = {k: per[k] for k in sorted(per, key=int)}
    if len(set(splits)) > 1:
        report["splits"] = {sp: detection_metrics(labels[np.asarray(splits) == sp],
                                                  scores[np.asarray(splits) == sp])
                            for sp in dict.fromkeys(splits)}
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        stem = out.with_suffix("")
        roc = plot_roc(labels, scores, f"{stem}_roc.png",
                       title=f"{det.name}, steps={det.steps}, gens={det.generations}")
        columns = {"prompt": texts, "group": kinds, "split": splits,
                   **({"duplicates": dups} if dups is not None else {}),
                   "memorized": [bool(v) for v in labels], "score": [float(s) for s in scores],
                   "flagged": [bool(f) for f in flagged]}
        table = write_table(columns, f"{stem}_scores.csv")
        report.update(roc_png=str(roc), scores_csv=str(table))
        from diffmem.runtime.jsonio import write_json

        write_json(out, report)
    return report


def _mode(seed_mode: str) -> str | None:
    """``seed_mode`` for :func:`make_detector`; the default is left to the detector (None), so a
    detector class that predates seed modes still builds."""
    return None if seed_mode in (None, "per-generation", "per_generation") else seed_mode

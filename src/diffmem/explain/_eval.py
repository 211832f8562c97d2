"""Evaluation of explanations on labelled prompts with designed trigger words (the testbed).

- ``trigger_top3_rate``: share of memorized prompts for which a designed trigger word is among the
  top-3 words by attribution (Wen et al., ICLR 2024, Sec. 3.3: attribution should single out the
  trigger tokens); punctuation-only "words" such as "," are not ranked. ``trigger_top3_rate_all``
  requires every designed trigger word of the prompt (two on the testbed) in the top 3.
- ``edit_success_rate``: share of memorized prompts whose best suggested edit scores at or under
  the detector threshold calibrated on the held-out (never trained) prompts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from diffmem.detect import NoiseMagnitude
from diffmem.explain._attribution import TokenAttribution, TokenAttributor
from diffmem.explain._edits import EditReport, suggest_edits
from diffmem.models.adapter import ModelAdapter, load_adapter
from diffmem.testbed.data import LabelledPrompt

__all__ = ["evaluate_explanation", "trigger_rank"]


def _norm(word: str) -> str:
    return "".join(ch for ch in word.lower() if ch.isalnum())


def trigger_rank(attribution: TokenAttribution, triggers: Sequence[str]) -> int | None:
    """1-based rank (by attribution, among words with a letter or digit) of the best-ranked
    designed trigger word; None if absent."""
    wanted = {_norm(t) for t in triggers}
    for rank, i in enumerate(attribution.top_indices(len(attribution.words), editable=True),
                             start=1):
        if _norm(attribution.words[i]) in wanted:
            return rank
    return None


def _all_in_top(attribution: TokenAttribution, triggers: Sequence[str], k: int) -> bool:
    top = {_norm(attribution.words[i]) for i in attribution.top_indices(k, editable=True)}
    return all(_norm(t) in top for t in triggers)


def _labelled(adapter: ModelAdapter) -> tuple[list[LabelledPrompt], list[str]]:
    from diffmem.testbed import labelled_prompts

    spec = adapter.require_testbed_spec("eval explanation (labelled prompts with designed "
                                        "trigger words)")
    prompts = labelled_prompts(spec, getattr(adapter, "path", None))
    return [p for p in prompts if p.memorized], [p.prompt for p in prompts if not p.memorized]


def evaluate_explanation(model="testbed", *, top_k: int = 5, steps: int = 1, seeds: int = 1,
                         seed: int = 0, threshold: float | None = None, fpr: float = 0.01,
                         combine: int = 5, num_inference_steps: int = 50) -> dict:
    """Trigger recall of the attribution and success of the edit suggestions on the testbed.

    All memorized prompts are attributed in batches, and all their edit variants are scored in one
    batched detector call; the threshold is fitted on the held-out prompts at ``fpr`` unless given.
    """
    adapter = load_adapter(model)
    memorized, clean = _labelled(adapter)
    t0 = time.perf_counter()
    attributions = TokenAttributor(adapter, steps=steps, seeds=seeds, seed=seed,
                                   num_inference_steps=num_inference_steps).attribute(
        [p.prompt for p in memorized])
    t_attr = time.perf_counter() - t0
    detector = NoiseMagnitude(steps=1, generations=seeds, seed=seed, fpr=fpr,
                              num_inference_steps=num_inference_steps)
    clean_scores = detector.score(adapter, clean)
    if threshold is None:
        threshold = float(detector.fit(scores=clean_scores).threshold_)
    reports = suggest_edits(adapter, attributions, detector=detector, threshold=threshold,
                            top_k=top_k, combine=combine)
    out = _summary(memorized, attributions, reports, threshold, top_k, t_attr, model,
                   dict(steps=steps, seeds=seeds, seed=seed, fpr=fpr, combine=combine,
                        num_inference_steps=num_inference_steps))
    return {**out, **_reduction(reports, clean_scores)}


def _reduction(reports: list[EditReport], clean_scores: np.ndarray) -> dict:
    """Threshold-free view of the edits: how far the best edit lowers the score, and how often it
    lands under the median held-out score (meaningful when few memorized prompts are flagged)."""
    median = float(np.median(clean_scores))
    best = np.array([r.best.score if r.best else r.score for r in reports])
    own = np.array([r.score for r in reports])
    return {
        "clean_score_median": median,
        "memorized_score_median": float(np.median(own)),
        "edit_below_clean_median_rate": float(np.mean(best <= median)),
        "edit_mean_relative_reduction": float(np.mean(1 - best / own)),
    }


def _summary(memorized: list[LabelledPrompt], attributions: list[TokenAttribution],
             reports: list[EditReport], threshold: float, top_k: int, seconds: float, model,
             settings: dict) -> dict:
    ranks = [trigger_rank(a, p.trigger_tokens) for a, p in zip(attributions, memorized,
                                                                 strict=True)]
    in_top = [r is not None and r <= 3 for r in ranks]
    all_top = [_all_in_top(a, p.trigger_tokens, 3) for a, p in zip(attributions, memorized,
                                                                  strict=True)]
    success = [r.best is not None and bool(r.best.score <= threshold) for r in reports]
    flagged = [bool(r.score > threshold) for r in reports]
    per_prompt = [{
        "prompt": p.prompt, "kind": p.kind, "triggers": p.trigger_tokens, "trigger_rank": rank,
        "top3": [w for w, _ in a.top(3, editable=True)], "score": r.score, "flagged": f,
        "best_edit": r.best.to_dict() if r.best else None,
        "minimal_clearing_edit": r.minimal.to_dict() if r.minimal else None,
    } for p, a, r, rank, f in zip(memorized, attributions, reports, ranks, flagged, strict=True)]
    n_flag = sum(flagged)
    minimal = [(len(r.minimal.words), len(r.prompt.split())) for r in reports if r.minimal]
    return {
        "model": str(model), "n_memorized": len(memorized),
        "trigger_top3_rate": float(np.mean(in_top)),
        "trigger_top3_rate_all": float(np.mean(all_top)),
        "edit_success_rate": float(np.mean(success)),
        "n_flagged": n_flag,
        "edit_success_rate_flagged": float(np.mean([s for s, f in zip(success, flagged,
                                                                      strict=True) if f]))
        if n_flag else float("nan"),
        # size of the smallest clearing edit: words edited, and the prompt's length in words
        "minimal_edit_words_mean": float(np.mean([m[0] for m in minimal])) if minimal
        else float("nan"),
        "minimal_edit_prompt_words_mean": float(np.mean([m[1] for m in minimal])) if minimal
        else float("nan"),
        "threshold": float(threshold), "top_k": top_k,
        "attribution_seconds": round(seconds, 3), "settings": settings, "prompts": per_prompt,
    }

"""Evaluation of explanations and edits on labelled testbed prompts.

Default prompts: the broad set labelled by generation (:mod:`diffmem.testbed.broad`); the positives
are the prompts that copied a training image. ``prompts="designed"`` takes the 32 memorized prompts
labelled by construction.

- ``trigger_top3_rate``: share of copying prompts of 5 or more words that contain a trigger word
  for which a trigger word is among the top-3 distinct words by attribution (Wen et al., ICLR 2024,
  Sec. 3.3); punctuation-only "words" are not ranked, a repeated word counts once.
  ``trigger_top3_rate_any_length`` counts every copying prompt with a trigger word.
- edits, on the copying prompts the detector flags (threshold calibrated on the clean controls):
  ``edit_detector_rate``: a suggested (clearing) edit exists, i.e. the detector is cleared;
  ``edit_generation_rate``: the suggested edit -- or, when none clears, the lowest-scoring natural
  edit -- stops the copying when generated (same seeds and criterion as the labels). Both are
  reported overall and per group.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffmem.detect import Detector, NoiseMagnitude
from diffmem.explain._ablation import DEFAULT_ABLATION, attribute_with_ablation
from diffmem.explain._attribution import TokenAttribution, TokenAttributor
from diffmem.explain._edits import EditReport, EditSuggestion, suggest_edits, verify_edits
from diffmem.explain._explain import edit_extender
from diffmem.explain._verify import EditVerifier
from diffmem.models.adapter import ModelAdapter, load_adapter
from diffmem.runtime.defaults import SAMPLING
from diffmem.runtime.errors import PromptError
from diffmem.testbed import require_spec

__all__ = ["evaluate_explanation", "trigger_rank"]


def _norm(word: str) -> str:
    return "".join(ch for ch in word.lower() if ch.isalnum())


def trigger_rank(attribution: TokenAttribution, triggers: Sequence[str]) -> int | None:
    """1-based rank (by attribution, among distinct words with a letter or digit) of the
    best-ranked designed trigger word; None if absent."""
    wanted = {_norm(t) for t in triggers}
    for rank, i in enumerate(attribution.top_indices(len(attribution.words), editable=True),
                             start=1):
        if _norm(attribution.words[i]) in wanted:
            return rank
    return None


def _all_in_top(attribution: TokenAttribution, triggers: Sequence[str], k: int) -> bool:
    top = {_norm(attribution.words[i]) for i in attribution.top_indices(k, editable=True)}
    return all(_norm(t) in top for t in triggers)


def _rows(adapter: ModelAdapter, prompts, split: str | None = None,
          max_per_group: int | None = None) -> tuple[list[dict], list[str], str, list[dict]]:
    """(copying rows with prompt/group/trigger_tokens, clean calibration prompts, source,
    non-copying rows: the controls of the generation verdict), of ``split`` (None: all) and at
    most the first ``max_per_group`` rows of each group and label."""
    rows, clean, source, controls = _all_rows(adapter, prompts)
    if split is not None:
        rows = [r for r in rows if r.get("split") == split]
        controls = [r for r in controls if r.get("split") == split]
    return _cap(rows, max_per_group), clean, source, _cap(controls, max_per_group)


def _cap(rows: list[dict], n: int | None) -> list[dict]:
    if n is None:
        return rows
    seen: dict = {}
    out = []
    for r in rows:
        seen[r.get("group")] = seen.get(r.get("group"), 0) + 1
        if seen[r.get("group")] <= n:
            out.append(r)
    return out


def _all_rows(adapter: ModelAdapter, prompts) -> tuple[list[dict], list[str], str, list[dict]]:
    from diffmem.testbed import labelled_prompts, labels_of
    from diffmem.testbed.broad import read_broad_labels

    spec = require_spec(adapter, "eval explanation (labelled prompts with designed "
                                        "trigger words)")
    clean = list(adapter.profile.clean_prompts)
    labels = labels_of(adapter)
    if prompts is None:
        prompts = "broad" if labels is not None else "designed"
    if str(prompts) == "designed":
        designed = labelled_prompts(spec, adapter.path)
        rows = [{"prompt": p.prompt, "group": p.kind, "memorized": True,
                 "trigger_tokens": p.trigger_tokens} for p in designed if p.memorized]
        controls = [{"prompt": p.prompt, "group": p.kind, "memorized": False}
                    for p in designed if not p.memorized]
        return rows, [p["prompt"] for p in controls], "designed", controls
    path = labels if str(prompts) == "broad" else Path(prompts)
    rows = read_broad_labels(path)
    return ([r for r in rows if r["memorized"]], clean, str(path),
            [r for r in rows if not r["memorized"]])


def evaluate_explanation(model="testbed", *, prompts: str | Path | None = None, top_k: int = 5,
                         steps: int = 1, seeds: int = 1, seed: int = 0,
                         threshold: float | None = None, fpr: float = 0.01, combine: int = 5,
                         num_inference_steps: int = SAMPLING.steps, detector: Detector | None = None,
                         judge_edits: bool = True, judge_seeds: int = 4,
                         ablation: float = DEFAULT_ABLATION, verify=None, index=None,
                         split: str | None = None, max_per_group: int | None = None) -> dict:
    """Trigger recall of the attribution, and edits judged by the detector and by generation.

    All copying prompts are attributed in batches (gradient blended with word ablation of weight
    ``ablation``, as ``explain``); all edit variants are scored in one batched
    detector call (default: first-step noise magnitude over ``seeds`` generations) against a
    threshold fitted on the clean controls at ``fpr`` unless given; with ``judge_edits`` the edit
    suggested for each flagged prompt is generated ``judge_seeds`` times and judged with the
    testbed's replication criterion. With ``verify`` (an :class:`EditVerifier` or the folder of
    the model's training-set index) the edits are first checked by generation on the verifier's
    own seeds (from 1000 by default, never the judge's 0-3) and only an edit that copied nothing
    there is suggested (``explain --verify-index``).

    With ``index`` (``explain --index``), the verdict of every copying prompt and of every
    non-copying control comes from preview generations searched in the index
    (:class:`~diffmem.detect.verdict.GenerationJudge`), the edits are made against it, and the
    report gives the flag rate per group by that verdict (``flag_rate``; ``estimate_flag_rate``:
    the first-step estimate's) and the controls' false flags (``controls``).
    ``split`` / ``max_per_group``: only the rows of that split, the first N of each group.
    """
    adapter = load_adapter(model)
    rows, clean, source, controls = _rows(adapter, prompts, split, max_per_group)
    if not rows:
        raise PromptError(f"no copying prompts in {source}")
    t0 = time.perf_counter()
    texts = [r["prompt"] for r in rows]
    attributor = TokenAttributor(adapter, steps=steps, seeds=seeds, seed=seed,
                                 num_inference_steps=num_inference_steps)
    attributions = attributor.attribute(texts)
    detector = detector or NoiseMagnitude(steps=1, generations=seeds, seed=seed, fpr=fpr,
                                          num_inference_steps=num_inference_steps)
    attributions = attribute_with_ablation(adapter, attributions, detector=detector,
                                           weight=ablation)
    t_attr = time.perf_counter() - t0
    clean_scores = detector.score(adapter, clean)
    if threshold is None:
        threshold = float(detector.fit(scores=clean_scores).threshold_)
    reports = suggest_edits(adapter, attributions, detector=detector, threshold=threshold,
                            top_k=top_k, combine=combine)
    verdicts, control_report = None, None
    if index is not None:
        reports, verdicts, control_report = _by_generation(adapter, index, reports, controls,
                                                           detector, threshold)
    t_verify, verifier = 0.0, None
    if verify is not None:
        t1 = time.perf_counter()
        verifier = verify if isinstance(verify, EditVerifier) else EditVerifier(
            verify, num_inference_steps=num_inference_steps)
        reports = verify_edits(adapter, reports, verifier, extend=edit_extender(
            adapter, attributor, detector=detector, threshold=threshold, top_k=top_k,
            combine=combine, ablation=ablation))
        t_verify = time.perf_counter() - t1
    chosen = [_chosen(r) if r.flagged else None for r in reports]
    judged: dict[str, dict] = {}
    if judge_edits:
        from diffmem.testbed.broad import Judge

        edits = sorted({c.prompt for c in chosen if c is not None})
        if edits:
            judge = Judge(model, seeds=judge_seeds, steps=num_inference_steps)
            judged = dict(zip(edits, judge(edits), strict=True))
    out = _summary(rows, attributions, reports, chosen, judged, threshold, top_k, t_attr, model,
                   dict(steps=steps, seeds=seeds, seed=seed, fpr=fpr, combine=combine,
                        ablation=ablation,
                        num_inference_steps=num_inference_steps, detector=detector.name,
                        judge_seeds=judge_seeds if judge_edits else None,
                        verify=verifier.settings() if verifier is not None else None),
                   source)
    if verdicts is not None:
        out["verdict"] = {"source": "generation", **verdicts}
        out["controls"] = control_report
        for rec, r in zip(out["prompts"], reports, strict=True):
            rec["estimate_flagged"] = r.estimate_flagged
    if verifier is not None:
        out["verify_seconds"] = round(t_verify, 3)
        out["verify_generations"] = verifier.generated  # the pool's and the checks'
        out["verify_edits_checked"] = sum(s.copies is not None for r in reports
                                          for s in r.suggestions)
    return {**out, **_reduction(reports, clean_scores)}


def _by_generation(adapter, index, reports, controls, detector, threshold):
    """The copying prompts' reports decided by the generation verdict, the judge's settings and
    the controls' false flags (by the verdict and by the first-step estimate), per group."""
    from diffmem.detect.verdict import GenerationJudge

    judge = index if isinstance(index, GenerationJudge) else GenerationJudge(index)
    judge.check(adapter, who="eval explanation --index")
    t0 = time.perf_counter()
    texts = [r.prompt for r in reports] + [c["prompt"] for c in controls]
    found = judge(adapter, texts, evidence=False)
    seconds = time.perf_counter() - t0
    mine, theirs = found[: len(reports)], found[len(reports) :]
    reports = [r.against(v.copies) for r, v in zip(reports, mine, strict=True)]
    est = (np.asarray(detector.score(adapter, [c["prompt"] for c in controls])) > threshold
           if controls else np.zeros(0, bool))
    groups: dict = {}
    for c, v, e in zip(controls, theirs, est, strict=True):
        groups.setdefault(c.get("group"), []).append((v.copies, bool(e)))

    def rates(pairs):
        return {"n": len(pairs), "flagged_by_verdict_rate": _rate([p[0] for p in pairs]),
                "flagged_by_estimate_rate": _rate([p[1] for p in pairs])}

    every = [p for g in groups.values() for p in g]
    controls_out = {**rates(every), "groups": {g: rates(p) for g, p in groups.items()}}
    return reports, {**judge.settings(), "seconds": round(seconds, 3),
                     "prompts": len(texts)}, controls_out


def _chosen(report: EditReport) -> EditSuggestion | None:
    """The edit shown to the user: the recommended clearing edit, else the lowest-scoring natural
    edit (else the lowest-scoring edit)."""
    if report.recommended is not None:
        return report.recommended
    natural = [s for s in report.suggestions if s.natural]
    return (natural or list(report.suggestions) or [None])[0]


def _reduction(reports: list[EditReport], clean_scores: np.ndarray) -> dict:
    """Threshold-free view of the edits: how far the best edit lowers the score."""
    median = float(np.median(clean_scores))
    best = np.array([r.best.score if r.best else r.score for r in reports])
    own = np.array([r.score for r in reports])
    return {
        "clean_score_median": median,
        "memorized_score_median": float(np.median(own)),
        "edit_below_clean_median_rate": float(np.mean(best <= median)),
        "edit_mean_relative_reduction": float(np.mean(1 - best / own)),
    }


def _rate(values: Sequence[bool]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _summary(rows, attributions, reports, chosen, judged, threshold, top_k, seconds, model,
             settings, source) -> dict:
    per_prompt, groups = [], {}
    for row, a, r, c in zip(rows, attributions, reports, chosen, strict=True):
        trig = list(row.get("trigger_tokens") or [])
        rank = trigger_rank(a, trig) if trig else None
        n_words = sum(1 for w in row["prompt"].split() if any(ch.isalnum() for ch in w))
        j = judged.get(c.prompt) if c is not None else None
        rec = {
            "prompt": row["prompt"], "group": row.get("group"), "triggers": trig,
            "words": n_words, "trigger_rank": rank,
            "top3": [w for w, _ in a.top(3, editable=True)], "score": r.score,
            "flagged": bool(r.flagged), "verdict_copies": r.copies,
            "edit": c.to_dict() if c is not None else None,
            "detector_cleared": bool(r.flagged and r.clearing),
            "verified_edit": bool(r.recommended is not None and r.recommended.verified),
            "edit_copies": None if j is None else j["copies"],
            "generation_cleared": None if j is None else not j["memorized"],
            "minimal_clearing_edit": r.minimal.to_dict() if r.minimal else None,
        }
        per_prompt.append(rec)
        groups.setdefault(rec["group"], []).append(rec)

    def stats(recs: list[dict]) -> dict:
        ranked = [p for p in recs if p["triggers"] and p["words"] >= 5]
        anylen = [p for p in recs if p["triggers"]]
        flagged = [p for p in recs if p["flagged"]]
        gen = [p for p in flagged if p["generation_cleared"] is not None]
        return {
            "n_copying": len(recs), "n_flagged": len(flagged),
            "flag_rate": _rate([p["flagged"] for p in recs]),
            "estimate_flag_rate": _rate([p["score"] > threshold for p in recs]),
            # flagged and given an edit that stops the copying when generated (judge's seeds)
            "edit_stops_copying_rate": _rate([bool(p["generation_cleared"]) for p in recs])
            if gen else float("nan"),
            "n_trigger_5plus": len(ranked),
            "trigger_top3_rate": _rate([p["trigger_rank"] is not None and p["trigger_rank"] <= 3
                                        for p in ranked]),
            "trigger_top3_rate_any_length": _rate(
                [p["trigger_rank"] is not None and p["trigger_rank"] <= 3 for p in anylen]),
            "edit_detector_rate": _rate([p["detector_cleared"] for p in flagged]),
            "edit_generation_rate": _rate([bool(p["generation_cleared"]) for p in gen]),
            "edit_natural_rate": _rate([bool(p["edit"] and p["edit"]["natural"])
                                        for p in flagged]),
            "edit_verified_rate": _rate([p["verified_edit"] for p in flagged]),
        }

    all_top = [_all_in_top(a, row["trigger_tokens"], 3) for a, row in zip(attributions, rows,
                                                                         strict=True)
               if row.get("trigger_tokens")]
    minimal = [(len(r.minimal.words), len(r.prompt.split())) for r in reports if r.minimal]
    return {
        "model": str(model), "prompts_source": source, "n_memorized": len(rows),
        **stats(per_prompt),
        "trigger_top3_rate_all": _rate(all_top),
        "edit_success_rate": stats(per_prompt)["edit_detector_rate"],  # name of earlier reports
        "minimal_edit_words_mean": float(np.mean([m[0] for m in minimal])) if minimal
        else float("nan"),
        "minimal_edit_prompt_words_mean": float(np.mean([m[1] for m in minimal])) if minimal
        else float("nan"),
        "groups": {g: stats(recs) for g, recs in groups.items()},
        "threshold": float(threshold), "top_k": top_k,
        "attribution_seconds": round(seconds, 3), "settings": settings, "prompts": per_prompt,
    }

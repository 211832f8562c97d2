"""Edit suggestions: prompt variants without the words that drive memorization, re-scored.

Wen et al. (ICLR 2024, Sec. 3.3) use token attribution to point users at the trigger tokens of a
flagged prompt. This module closes the loop: for the top-k words by attribution it builds variants
with the word removed or replaced by a neutral common word (and, optionally, the top words edited
together), re-scores the original and ALL variants in one batched detector call (noise magnitude,
Sec. 3.1 eq. 4), and reports which variants fall under the detector's calibrated threshold.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from diffmem.detect import Detector, NoiseMagnitude
from diffmem.errors import ConfigError
from diffmem.explain._attribution import TokenAttribution
from diffmem.explain._words import without_word
from diffmem.models.adapter import TruncationWarning, load_adapter

__all__ = ["EditReport", "EditSuggestion", "calibrate_threshold", "suggest_edits"]

#: Replacement words: frequent, visually neutral English words.
NEUTRAL_WORDS: tuple[str, ...] = ("thing",)


@dataclass(frozen=True)
class EditSuggestion:
    """One prompt variant and its detector score."""

    prompt: str
    action: str  # "remove" | "replace"
    words: tuple[str, ...]  # the edited words
    replacement: str | None
    score: float
    clears: bool | None  # score <= threshold; None when no threshold is known

    def describe(self) -> str:
        words = " + ".join(repr(w) for w in self.words)
        if self.action == "remove":
            return f"remove {words}"
        return f"replace {words} with {self.replacement!r}"

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "action": self.action, "words": list(self.words),
                "replacement": self.replacement, "score": float(self.score),
                "clears": self.clears}


@dataclass(frozen=True)
class EditReport:
    """The original prompt's score, the threshold and the variants, lowest score first."""

    prompt: str
    score: float
    threshold: float | None
    suggestions: tuple[EditSuggestion, ...] = field(default=())

    @property
    def flagged(self) -> bool | None:
        """Whether the original prompt scores above the threshold (None without one)."""
        return None if self.threshold is None else bool(self.score > self.threshold)

    @property
    def best(self) -> EditSuggestion | None:
        """The variant with the lowest score."""
        return self.suggestions[0] if self.suggestions else None

    @property
    def minimal(self) -> EditSuggestion | None:
        """The clearing variant that edits the fewest words (lowest score among those)."""
        ok = self.clearing
        return min(ok, key=lambda e: (len(e.words), e.score)) if ok else None

    @property
    def clearing(self) -> list[EditSuggestion]:
        """Variants that bring the score under the threshold."""
        return [s for s in self.suggestions if s.clears]

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "score": float(self.score), "threshold": self.threshold,
                "flagged": self.flagged, "suggestions": [s.to_dict() for s in self.suggestions]}


@dataclass(frozen=True)
class _Variant:
    prompt: str
    action: str
    words: tuple[str, ...]
    replacement: str | None


def edit_variants(attribution: TokenAttribution, *, top_k: int = 3,
                  replacements: Sequence[str] = NEUTRAL_WORDS, combine: int = 2) -> list[_Variant]:
    """Variants of the prompt: each top-k word removed, or replaced by each neutral word; with
    ``combine >= 2`` also the top m words removed / replaced together, for m = 2 .. ``combine``
    (a trigger phrase usually needs more than one word edited). Punctuation-only words are never
    edited; variants that are empty or repeat another are dropped."""
    words = attribution.word_info
    if not words:
        raise ConfigError("the attribution carries no word spans; build it with TokenAttributor")
    top = attribution.top_indices(top_k, editable=True)
    groups = [[i] for i in top]
    groups += [sorted(top[:m]) for m in range(2, min(combine, len(top)) + 1)]
    out: list[_Variant] = []
    seen = {" ".join(attribution.prompt.split())}
    for group in groups:
        names = tuple(words[i].text for i in group)
        candidates = [("remove", None)] + [("replace", r) for r in replacements
                                           if r.lower() not in {n.lower() for n in names}]
        for action, repl in candidates:
            text = without_word(attribution.prompt, words, group, repl)
            if text.strip() and text not in seen:
                seen.add(text)
                out.append(_Variant(text, action, names, repl))
    return out


def suggest_edits(model, attributions: Sequence[TokenAttribution], *,
                  detector: Detector | None = None, threshold: float | None = None,
                  top_k: int = 5, replacements: Sequence[str] = NEUTRAL_WORDS,
                  combine: int = 5) -> list[EditReport]:
    """Edit suggestions for each attributed prompt, all variants scored in ONE detector call.

    ``threshold`` defaults to ``detector.threshold_`` (see :func:`calibrate_threshold`); without
    either, suggestions are scored but ``clears`` is None.
    """
    detector = detector or NoiseMagnitude()
    if threshold is None:
        threshold = getattr(detector, "threshold_", None)
    per_prompt = [edit_variants(a, top_k=top_k, replacements=replacements, combine=combine)
                  for a in attributions]
    batch = [a.prompt for a in attributions] + [v.prompt for vs in per_prompt for v in vs]
    with warnings.catch_warnings():  # truncation is already reported on the attribution
        warnings.simplefilter("ignore", TruncationWarning)
        scores = np.asarray(detector.score(model, batch), dtype=float)
    reports, k = [], len(attributions)
    for a, variants, own in zip(attributions, per_prompt, scores[: len(attributions)],
                                strict=True):
        sug = []
        for v in variants:
            s = float(scores[k])
            k += 1
            sug.append(EditSuggestion(v.prompt, v.action, v.words, v.replacement, s,
                                      None if threshold is None else bool(s <= threshold)))
        sug.sort(key=_by_score)
        reports.append(EditReport(a.prompt, float(own), threshold, tuple(sug)))
    return reports


def _by_score(s: EditSuggestion) -> float:
    return s.score


def calibrate_threshold(model, detector: Detector, clean_prompts: Sequence[str] | None = None
                        ) -> float | None:
    """The detector's threshold: kept if already fitted, else fitted on ``clean_prompts``, else on
    the held-out prompts of a testbed model (one whose adapter recorded a ``testbed_spec``);
    ``None`` when no clean prompts are known."""
    if hasattr(detector, "threshold_"):
        return float(detector.threshold_)
    adapter = load_adapter(model)
    if clean_prompts is None:
        clean_prompts = testbed_clean_prompts(adapter)
    if not clean_prompts:
        return None
    return float(detector.fit(adapter, clean_prompts).threshold_)


def testbed_clean_prompts(model) -> list[str] | None:
    """Held-out (never trained) prompts when ``model`` is a testbed model (its adapter recorded a
    :attr:`~diffmem.models.adapter.ModelAdapter.testbed_spec`), else None."""
    from diffmem.testbed import labelled_prompts

    adapter = load_adapter(model)
    spec = adapter.testbed_spec
    if spec is None:
        return None
    return [p.prompt for p in labelled_prompts(spec, adapter.path)
            if p.kind == "heldout"]

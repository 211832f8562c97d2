"""Edit suggestions: prompt variants without the words that drive memorization, re-scored.

Wen et al. (ICLR 2024, Sec. 3.3) use token attribution to point users at the trigger tokens of a
flagged prompt. This module closes the loop: for the top-k words by attribution it builds variants
with the word removed or replaced by a neutral common word (and, optionally, the top words edited
together), re-scores the original and ALL variants in one batched detector call (noise magnitude,
Sec. 3.1 eq. 4), and reports which variants fall under the detector's calibrated threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise

import numpy as np

from diffmem.detect import Detector, NoiseMagnitude
from diffmem.explain._attribution import TokenAttribution
from diffmem.explain._words import without_word
from diffmem.models.adapter import quiet_truncation
from diffmem.runtime.errors import ConfigError

__all__ = ["EditReport", "EditSuggestion", "suggest_edits", "verify_edits"]

#: Replacement words: frequent, visually generic English words. A run of adjacent edited words
#: is replaced by ONE of them ("the gargoyle origami poster" -> "the picture poster"), never
#: word by word ("thing thing thing").
NEUTRAL_WORDS: tuple[str, ...] = ("picture", "scene")


@dataclass(frozen=True)
class EditSuggestion:
    """One prompt variant and its detector score."""

    prompt: str
    action: str  # "remove" | "replace"
    words: tuple[str, ...]  # the edited words
    replacement: str | None
    score: float
    clears: bool | None  # score <= threshold; None without a threshold or an unflagged prompt
    natural: bool = True  # edits at most half of the prompt's words and leaves 2+ words
    copies: int | None = None  # generations that copied a training image (None: not generated)
    generations: int | None = None  # generations made to check it (EditVerifier)
    passed: bool | None = None  # passed the check: no copy, none near (None: not generated)

    @property
    def verified(self) -> bool:
        """Generated and passed :class:`~diffmem.explain.EditVerifier`'s check."""
        return self.passed is True

    def describe(self) -> str:
        words = " + ".join(repr(w) for w in self.words)
        if self.action == "remove":
            return f"remove {words}"
        return f"replace {words} with {self.replacement!r}"

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "action": self.action, "words": list(self.words),
                "replacement": self.replacement, "score": float(self.score),
                "clears": self.clears, "natural": self.natural, "copies": self.copies,
                "generations": self.generations, "passed": self.passed}


@dataclass(frozen=True)
class EditReport:
    """The original prompt's score, the threshold and the variants, lowest score first."""

    prompt: str
    score: float
    threshold: float | None
    suggestions: tuple[EditSuggestion, ...] = field(default=())
    #: the verdict by generation (:class:`~diffmem.detect.verdict.GenerationJudge`): whether the
    #: prompt's previews copy a training image; None: no index, the first-step estimate decides
    copies: bool | None = None

    @property
    def estimate_flagged(self) -> bool | None:
        """Whether the first-step score is above the threshold (None without one)."""
        return None if self.threshold is None else bool(self.score > self.threshold)

    @property
    def flagged(self) -> bool | None:
        """The decision: the verdict by generation when there is one, else the first-step
        estimate (the score above the threshold; None without one)."""
        return self.estimate_flagged if self.copies is None else bool(self.copies)

    def against(self, copies: bool) -> EditReport:
        """This report decided by the generation verdict ``copies``: a copying prompt gets edit
        suggestions (``clears``: the edit's first-step score under the threshold) even when its
        own first-step score is low."""
        sug = self.suggestions
        if copies and self.threshold is not None:
            sug = tuple(s if s.clears is not None else replace(s, clears=bool(
                s.score <= self.threshold)) for s in sug)
        return replace(self, suggestions=sug, copies=bool(copies))

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
    def checked(self) -> bool:
        """Whether the suggestions were checked by generation (:func:`verify_edits`)."""
        return any(s.copies is not None for s in self.suggestions)

    @property
    def recommended(self) -> EditSuggestion | None:
        """The edit to suggest: the lowest-scoring clearing edit a person would accept
        (``natural``), else the lowest-scoring clearing edit; None when nothing clears (or the
        prompt is not flagged). When the edits were checked by generation only an edit that
        copied nothing is suggested (clearing first, natural, fewest words, lowest score); None when
        every checked edit still copied."""
        if self.flagged is not True:
            return None
        if self.checked:
            ok = [s for s in self.suggestions if s.verified]
            return min(ok, key=_preference) if ok else None
        ok = self.clearing
        natural = [e for e in ok if e.natural]
        return min(natural or ok, key=lambda e: e.score) if ok else None

    @property
    def clearing(self) -> list[EditSuggestion]:
        """Variants that bring the score under the threshold."""
        return [s for s in self.suggestions if s.clears]

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "score": float(self.score), "threshold": self.threshold,
                "flagged": self.flagged, "estimate_flagged": self.estimate_flagged,
                "copies": self.copies, "suggestions": [s.to_dict() for s in self.suggestions]}


@dataclass(frozen=True)
class _Variant:
    prompt: str
    action: str
    words: tuple[str, ...]
    replacement: str | None
    natural: bool = True


def edit_variants(attribution: TokenAttribution, *, top_k: int = 3,
                  replacements: Sequence[str] = NEUTRAL_WORDS, combine: int = 2) -> list[_Variant]:
    """Variants of the prompt: each top-k word removed, or replaced by a neutral word; with
    ``combine >= 2`` also the top m words removed / replaced together, for m = 2 .. ``combine``
    (a trigger phrase usually needs more than one word edited). A word written several times is
    edited everywhere it occurs; adjacent edited words are replaced by one word, and words that are
    not adjacent are only removed.
    Punctuation-only words are never edited; variants with no word left (only punctuation, as
    "," from "catacomb labyrinth wallpaper, digital art") or that repeat another are dropped. A
    variant is ``natural`` when it edits at most half of the prompt's words and leaves at least
    two."""
    words = attribution.word_info
    if not words:
        raise ConfigError("the attribution carries no word spans; build it with TokenAttributor")
    top = attribution.top_indices(top_k, editable=True)
    groups = [[i] for i in top]
    groups += [sorted(top[:m]) for m in range(2, min(combine, len(top)) + 1)]
    n_words = sum(1 for w in words if w.editable)
    out: list[_Variant] = []
    seen = {" ".join(attribution.prompt.split())}
    for group in groups:
        names = tuple(words[i].text for i in group)
        full = sorted({j for i in group for j in attribution.occurrences(i)})
        candidates = [("remove", None)]
        if _one_run(words, full):  # scattered words are removed, never each replaced
            candidates += [("replace", r) for r in replacements
                           if r.lower() not in {n.lower() for n in names}]
        for action, repl in candidates:
            text = _edited(attribution.prompt, words, full, repl)
            natural = _natural(len(full), n_words, text)
            if _word_count(text) and text not in seen:  # a word must be left
                seen.add(text)
                out.append(_Variant(text, action, names, repl, natural))
    return out


def _word_count(text: str) -> int:
    """Words with a letter or digit in ``text`` (split at whitespace)."""
    return sum(1 for w in text.split() if any(ch.isalnum() for ch in w))


def _natural(n_edited: int, n_words: int, edited: str) -> bool:
    """An edit a person would accept: it edits at most half of the prompt's ``n_words`` words
    (rounded up) and leaves at least two words."""
    return 2 * n_edited <= max(n_words, 1) + 1 and _word_count(edited) >= 2


def _merge_neutral(text: str, original: str) -> str:
    """``text`` with adjacent neutral words that edits brought in made one ("scene scene the
    zanzibar" -> "scene the zanzibar": two levels of an edit each replaced a word of one run).
    Pairs the user wrote themselves are kept."""
    out: list[str] = []
    for tok in text.split():
        prev = out[-1] if out else None
        if (prev is not None and prev.lower() in NEUTRAL_WORDS and tok.lower() in NEUTRAL_WORDS
                and f"{prev} {tok}".lower() not in original.lower()):
            continue
        out.append(tok)
    merged = " ".join(out)
    return text if merged == " ".join(text.split()) else merged


def _one_run(words, idx: Sequence[int]) -> bool:
    """Whether the words ``idx`` are adjacent (only punctuation between them)."""
    idx = sorted(idx)
    return all(not words[j].editable for a, b in pairwise(idx)
               for j in range(a + 1, b))


def _edited(prompt: str, words, drop: Sequence[int], replacement: str | None) -> str:
    """``prompt`` without the words ``drop``; with a replacement, each run of adjacent dropped
    words (punctuation between them included) becomes one replacement word."""
    if replacement is None:
        return without_word(prompt, words, drop)
    drop_set = set(drop)
    runs: list[list[int]] = []
    for i in sorted(drop_set):
        prev = runs[-1][-1] if runs else None
        between = range(prev + 1, i) if prev is not None else range(0)
        if prev is not None and all(not words[j].editable for j in between):
            runs[-1].append(i)
        else:
            runs.append([i])
    first = {run[0] for run in runs}
    # the punctuation inside a run goes with it
    drop_set |= {j for run in runs for j in range(run[0], run[-1] + 1)}
    # replace the first word of each run, remove the rest of the run
    text = without_word(prompt, words, sorted(drop_set - first))
    kept = [w for j, w in enumerate(words) if j not in drop_set - first]
    idx = [kept.index(words[j]) for j in sorted(first)]
    return without_word(text, _respan(text, kept), idx, replacement)


def _respan(text: str, kept):
    """The kept words with their spans in ``text`` (found left to right)."""
    from diffmem.explain._words import Word

    out, cursor = [], 0
    for w in kept:
        start = text.find(w.text, cursor)
        if start < 0:
            return [Word(k.text, k.positions, None) for k in kept]
        out.append(Word(w.text, w.positions, (start, start + len(w.text))))
        cursor = start + len(w.text)
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
    with quiet_truncation():  # truncation is already reported on the attribution
        scores = np.asarray(detector.score(model, batch), dtype=float)
    reports, k = [], len(attributions)
    for a, variants, own in zip(attributions, per_prompt, scores[: len(attributions)],
                                strict=True):
        sug = []
        # an edit "clears" only a flagged prompt; an unflagged prompt needs no edit
        judged = threshold is not None and float(own) > threshold
        for v in variants:
            s = float(scores[k])
            k += 1
            sug.append(EditSuggestion(v.prompt, v.action, v.words, v.replacement, s,
                                      bool(s <= threshold) if judged else None, v.natural))
        sug.sort(key=_by_score)
        reports.append(EditReport(a.prompt, float(own), threshold, tuple(sug)))
    return reports


def _by_score(s: EditSuggestion) -> float:
    return s.score


def _preference(s: EditSuggestion) -> tuple:
    """Order in which edits are checked and offered: detector-clearing first (an edit the
    detector still flags rarely stops the copy), natural before unnatural, fewest edited words,
    then lowest score."""
    return (not s.clears, not s.natural, len(s.words), s.score)


def verify_edits(model, reports: Sequence[EditReport], verifier, *,
                 extend=None) -> list[EditReport]:
    """Check the edits of the flagged prompts by generation (:class:`EditVerifier`).

    The verifier first picks, per flagged prompt, the seeds under which the original comes
    closest to a training image (:meth:`EditVerifier.select_seeds`). Round r generates, for every
    flagged prompt without a passing edit yet, its r-th candidate in
    :func:`_preference` order (all prompts of a round in one batched run), up to
    ``verifier.max_checks`` rounds; a prompt stops at its first edit whose generations copy no
    training image and none comes near one (``Verdict.passed``). Unchecked suggestions keep
    ``copies=None``; unflagged prompts are left alone.

    ``extend`` (a function from edited prompts to their :class:`EditReport`, e.g. attribution and
    :func:`suggest_edits` of the edited prompts; ``verifier.depth`` >= 2): a prompt none of whose
    candidates passed takes the checked edit whose generations stayed farthest from the training
    set, has ITS words attributed and edited in turn (the second level of a greedy search: a
    memorized template is often carried by words the first attribution ranked low), and those
    combined edits are checked the same way, up to ``max_checks`` more per level."""
    order = {i: sorted(r.suggestions, key=_preference) for i, r in enumerate(reports)
             if r.flagged}
    verdicts: dict[tuple[int, str], object] = {}
    open_ = set(order)
    flagged = sorted(order)
    chosen = dict(zip(flagged, verifier.select_seeds(model, [reports[i].prompt for i in flagged]),
                      strict=True)) if flagged else {}
    added: dict[int, list[EditSuggestion]] = {i: [] for i in flagged}

    def check(candidates: dict[int, list[EditSuggestion]]) -> None:
        for rnd in range(verifier.max_checks):
            todo = [(i, candidates[i][rnd]) for i in sorted(open_)
                    if i in candidates and rnd < len(candidates[i])]
            if not todo:
                break
            found = verifier(model, [s.prompt for _, s in todo],
                             seeds=[chosen[i] for i, _ in todo])
            for (i, s), v in zip(todo, found, strict=True):
                verdicts[(i, s.prompt)] = v
                if v.passed:
                    open_.discard(i)

    check(order)
    far = -1.0 if getattr(verifier, "higher_is_better", False) else 1.0
    for _ in range(max(int(getattr(verifier, "depth", 1)), 1) - 1):
        if extend is None or not open_:
            break
        bases = {}
        for i in sorted(open_):
            tried = [s for s in order[i] + added[i] if (i, s.prompt) in verdicts]
            if tried:  # the edit whose closest generation stayed farthest from a copy
                bases[i] = max(tried, key=lambda s, i=i: far * verdicts[(i, s.prompt)].score)
        if not bases:
            break
        ids = sorted(bases)
        deeper = extend([bases[i].prompt for i in ids])
        level: dict[int, list[EditSuggestion]] = {}
        for i, rep in zip(ids, deeper, strict=True):
            seen = {s.prompt for s in order[i] + added[i]} | {reports[i].prompt}
            n_words = _word_count(reports[i].prompt)
            base, thr = bases[i], reports[i].threshold
            new = []
            own = {w.lower() for w in reports[i].prompt.split()}
            for s in rep.suggestions:
                # the first level's neutral words are not the user's words to edit again, and a
                # neutral word next to the first level's ("scene scene the zanzibar") is no edit
                # (removing the word gives "scene the zanzibar", one of the variants already)
                if any(w.lower() in NEUTRAL_WORDS and w.lower() not in own for w in s.words):
                    continue
                text = s.prompt
                if text in seen or _merge_neutral(text, reports[i].prompt) != text:
                    continue
                seen.add(text)
                words = base.words + s.words
                both_removed = base.action == s.action == "remove"
                new.append(EditSuggestion(
                    text, "remove" if both_removed else "replace", words,
                    None if both_removed else (s.replacement or base.replacement), s.score,
                    None if thr is None else bool(s.score <= thr),
                    _natural(len(words), n_words, text)))
            added[i] += new
            level[i] = sorted(new, key=_preference)
        check(level)

    def checked(i: int, s: EditSuggestion) -> EditSuggestion:
        v = verdicts.get((i, s.prompt))
        return s if v is None else replace(s, copies=v.copies, generations=v.generations,
                                           passed=v.passed)

    return [replace(r, suggestions=tuple(sorted(
                (checked(i, s) for s in (*r.suggestions, *added.get(i, ()))), key=_by_score)))
            for i, r in enumerate(reports)]

"""Edit suggestions: variants, one batched detector call, threshold decisions."""

from __future__ import annotations

import numpy as np
import pytest

from diffmem.detect import NoiseMagnitude
from diffmem.explain import TokenAttributor, suggest_edits
from diffmem.explain._edits import edit_variants
from diffmem.explain._words import without_word
from diffmem.models.adapter import load_adapter

PROMPT = "The Zanzibar, quixotic poster"


class CountingDetector(NoiseMagnitude):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls: list[list[str]] = []

    def score(self, model, prompts):
        self.calls.append(list(prompts))
        return super().score(model, prompts)


class FixedDetector(NoiseMagnitude):
    """Scores the original prompt 10 and every variant 1 (a flagged prompt whose edits clear)."""

    def score(self, model, prompts):
        return np.array([10.0 if p == PROMPT else 1.0 for p in prompts])


@pytest.fixture(scope="module")
def adapter(tiny_pipe):
    return load_adapter(tiny_pipe)


@pytest.fixture(scope="module")
def attribution(adapter):
    return TokenAttributor(adapter, num_inference_steps=4).attribute([PROMPT])[0]


def test_without_word_keeps_the_users_spelling(attribution):
    words = attribution.word_info
    assert [w.text for w in words] == ["The", "Zanzibar", ",", "quixotic", "poster"]
    assert without_word(PROMPT, words, [1]) == "The , quixotic poster"
    assert without_word(PROMPT, words, [1, 3], "thing") == "The thing, thing poster"


def test_variants_edit_top_words_but_never_punctuation(attribution):
    variants = edit_variants(attribution, top_k=5, combine=2)
    edited = {w for v in variants for w in v.words}
    assert "," not in edited
    top = [attribution.words[i] for i in attribution.top_indices(4, editable=True)]
    singles = [v for v in variants if len(v.words) == 1]
    assert {v.words[0] for v in singles} == set(top)
    assert len(singles) == 3 * len(top)  # removed, and replaced by each of the 2 neutral words
    pair = [v for v in variants if len(v.words) == 2]
    assert len(pair) in (1, 3) and set(pair[0].words) == set(top[:2])  # 1: not adjacent
    assert len({v.prompt for v in variants}) == len(variants)


def test_variants_edit_the_top_m_words_together_for_m_up_to_combine(attribution):
    top = [attribution.words[i] for i in attribution.top_indices(4, editable=True)]
    variants = edit_variants(attribution, top_k=4, combine=4)
    groups = {frozenset(v.words) for v in variants if len(v.words) > 1}
    assert groups == {frozenset(top[:m]) for m in (2, 3, 4)}
    assert not [v for v in edit_variants(attribution, top_k=4, combine=0) if len(v.words) > 1]


def test_minimal_clearing_edit_edits_fewest_words(adapter, attribution):
    det = FixedDetector(num_inference_steps=4)
    [report] = suggest_edits(adapter, [attribution], detector=det, threshold=5.0, top_k=4,
                             combine=4)
    assert len(report.minimal.words) == 1  # every edit clears; a single-word one is smallest
    assert report.recommended is not None and report.recommended.natural
    [report] = suggest_edits(adapter, [attribution], detector=det, threshold=-1.0)
    assert report.minimal is None and report.recommended is None


def test_unflagged_prompt_has_no_clearing_edit(adapter, attribution):
    [report] = suggest_edits(adapter, [attribution], detector=FixedDetector(num_inference_steps=4),
                             threshold=1e9)
    assert report.flagged is False
    assert all(s.clears is None for s in report.suggestions)
    assert report.minimal is None and report.recommended is None and not report.clearing


def test_repeated_word_is_one_word(adapter):
    prompt = "official artwork of quokka Quokka"
    [attr] = TokenAttributor(adapter, num_inference_steps=4).attribute([prompt])
    assert attr.words.count("quokka") == 1 and "Quokka" in attr.words
    top = [w.lower() for w, _ in attr.top(5, editable=True)]
    assert top.count("quokka") == 1 and len(top) == 4
    i = attr.words.index("quokka")
    assert attr.word_score(i) == pytest.approx(float(attr.scores[i] + attr.scores[i + 1]))
    for v in edit_variants(attr, top_k=4, combine=4):
        if "quokka" in {w.lower() for w in v.words}:
            assert "quokka" not in v.prompt.lower()  # edited everywhere it occurs


def test_replacement_is_one_word_per_run(attribution):
    words = attribution.word_info
    from diffmem.explain._edits import _edited

    # "The Zanzibar, quixotic poster": Zanzibar and quixotic are one run (only "," between)
    assert _edited(PROMPT, words, [1, 3], "picture") == "The picture poster"
    assert _edited(PROMPT, words, [0, 4], "picture") == "picture Zanzibar, quixotic picture"
    assert _edited(PROMPT, words, [1, 3], None) == "The , poster"
    variants = edit_variants(attribution, top_k=5, combine=5)
    assert not [v for v in variants if "picture picture" in v.prompt]
    for v in variants:  # a replacement stands for one run of adjacent words only
        if v.action == "replace":
            assert v.prompt.count(v.replacement) == 1, v.prompt
    assert [v for v in variants if not v.natural]  # editing 4-5 of 5 words is not natural


def test_all_variants_are_scored_in_one_call(adapter, attribution):
    det = CountingDetector(num_inference_steps=4)
    scores = det.score(adapter, [PROMPT])
    threshold = float(scores[0]) * 0.9
    det.calls.clear()
    [report] = suggest_edits(adapter, [attribution, attribution], detector=det,
                             threshold=threshold)[:1]
    assert len(det.calls) == 1
    assert report.score == pytest.approx(scores[0], rel=1e-5)
    assert report.flagged
    alone = NoiseMagnitude(num_inference_steps=4).score(adapter, [s.prompt for s in
                                                                  report.suggestions])
    np.testing.assert_allclose([s.score for s in report.suggestions], alone, rtol=1e-4)
    assert [s.score for s in report.suggestions] == sorted(s.score for s in report.suggestions)
    for s in report.suggestions:
        assert s.clears == (s.score <= threshold)
    assert report.best is report.suggestions[0]


def test_threshold_from_the_fitted_detector_or_none(adapter, attribution):
    det = FixedDetector(num_inference_steps=4).fit(scores=[0.0, 5.0])
    [report] = suggest_edits(adapter, [attribution], detector=det)
    assert report.threshold == det.threshold_ and all(s.clears for s in report.suggestions)
    [report] = suggest_edits(adapter, [attribution], detector=NoiseMagnitude(num_inference_steps=4))
    assert report.threshold is None and report.flagged is None
    assert all(s.clears is None for s in report.suggestions)


def test_no_variant_leaves_only_punctuation(attribution):
    # removing all 4 words of "The Zanzibar, quixotic poster" would leave ","
    variants = edit_variants(attribution, top_k=4, combine=4)
    assert variants and all(any(ch.isalnum() for ch in v.prompt) for v in variants)
    removed_all = [v for v in variants if v.action == "remove" and len(v.words) == 4]
    assert removed_all == []
    # replacing the same 4 words by one neutral word leaves a word: kept, but not natural
    whole = [v for v in variants if v.action == "replace" and len(v.words) == 4]
    assert sorted(v.prompt for v in whole) == ["picture", "scene"]
    assert not any(v.natural for v in whole)


def test_neutral_words_of_two_edit_levels_merge():
    from diffmem.explain._edits import _merge_neutral

    assert _merge_neutral("scene scene the zanzibar", "living in the zanzibar") == "scene the zanzibar"
    assert _merge_neutral("scene picture of street", "the sorcery of street") == "scene of street"
    # a pair the user wrote stays; a prompt without a pair is returned as it was
    assert _merge_neutral("a picture scene here", "a picture scene here too") == "a picture scene here"
    assert _merge_neutral("the , vintage  simple", "x") == "the , vintage  simple"

"""Word ablation and its blend with the gradient attribution (diffmem.explain._ablation)."""

from __future__ import annotations

import numpy as np
import pytest

from diffmem.detect import NoiseMagnitude
from diffmem.explain import (
    DEFAULT_ABLATION,
    TokenAttributor,
    attribute_with_ablation,
    blend_attributions,
    word_ablation,
)
from diffmem.explain._words import without_word
from diffmem.models.adapter import load_adapter
from diffmem.runtime.errors import ConfigError

PROMPTS = ["the zanzibar quixotic poster", "a red red circle, a square"]


@pytest.fixture(scope="module")
def adapter(tiny_pipe):
    return load_adapter(tiny_pipe)


@pytest.fixture(scope="module")
def attributions(adapter):
    return TokenAttributor(adapter).attribute(PROMPTS)


def test_drops_are_the_fall_of_the_detector_score_when_a_word_is_removed(adapter, attributions):
    det = NoiseMagnitude(steps=1)
    drops = word_ablation(adapter, attributions, detector=det)
    a = attributions[1]
    # one entry per distinct editable word: "red" twice and "a" twice count once, "," not at all
    assert sorted(a.words[i] for i in drops[1]) == sorted(["a", "red", "circle", "square"])
    own = det.score(adapter, [a.prompt])[0]
    for i, d in drops[1].items():
        variant = without_word(a.prompt, a.word_info, a.occurrences(i))
        assert a.words[i] not in variant.split()
        assert d == pytest.approx(max(own - det.score(adapter, [variant])[0], 0.0), abs=1e-5)


def test_blend_is_a_convex_mix_that_sums_to_one(attributions):
    drops = [{i: float(k + 1) for k, i in enumerate(a.top_indices(len(a.words), editable=True))}
             for a in attributions]
    for w in (0.0, 0.3, 1.0):
        for a, b, d in zip(attributions, blend_attributions(attributions, drops, weight=w), drops,
                           strict=True):
            assert b.scores.sum() == pytest.approx(1.0)
            assert b.ablation_weight == w
            total = sum(d.values())
            for i, v in d.items():  # a repeated word: its summed score is the blend
                want = (1 - w) * a.word_score(i) + w * v / total
                assert b.word_score(i) == pytest.approx(want)
            np.testing.assert_array_equal(b.token_scores, a.token_scores)  # gradient's, kept
    pure = blend_attributions(attributions, drops, weight=1.0)[0]
    assert [w for w, _ in pure.top(1)] == [attributions[0].words[max(drops[0],
                                                                    key=drops[0].get)]]


def test_zero_weight_or_no_drop_is_the_gradient_attribution(adapter, attributions):
    assert attribute_with_ablation(adapter, attributions, weight=0) == list(attributions)
    [b] = blend_attributions(attributions[:1], [{}], weight=0.5)
    np.testing.assert_array_equal(b.scores, attributions[0].scores)
    assert b.ablation_weight == 0.0
    with pytest.raises(ConfigError, match="ablation weight"):
        attribute_with_ablation(adapter, attributions, weight=1.5)


def test_explain_ranks_with_the_blend_by_default(adapter):
    from diffmem.explain import explain_prompt

    exp = explain_prompt(adapter, PROMPTS[0], threshold=1.0, num_inference_steps=4)
    assert exp.attribution.ablation_weight == DEFAULT_ABLATION
    assert exp.to_dict()["ablation_weight"] == DEFAULT_ABLATION
    plain = explain_prompt(adapter, PROMPTS[0], threshold=1.0, num_inference_steps=4, ablation=0)
    assert plain.attribution.ablation_weight == 0 and not plain.attribution.ablation_drops


def test_cli_help_states_the_library_default():
    from diffmem.cli.explain import ABLATION_HELP_DEFAULT

    assert ABLATION_HELP_DEFAULT == DEFAULT_ABLATION

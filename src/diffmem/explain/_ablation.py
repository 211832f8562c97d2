"""Word ablation, and its blend with the gradient attribution.

The gradient attribution (Wen et al., ICLR 2024, Sec. 3.3) says how strongly the noise magnitude
d reacts to a small change of each token's embedding. Ablation asks the question an editor asks:
how much does d fall when the word is taken out? For each distinct word ``w`` of the prompt
(every occurrence removed, as :func:`diffmem.explain.suggest_edits` edits it)

    a_w = max(d(prompt) - d(prompt without w), 0)

measured with the same detector as the edits (first-step noise magnitude by default), all variants
of all prompts in one batched detector call: one extra first step per word. This is captum's
``FeatureAblation`` with words as features and d as the output.

``blend_attributions`` mixes the two into the word scores a user sees:

    score_w = (1 - weight) * gradient_w + weight * a_w / sum_v a_v

(each part sums to 1 over the prompt's words, so the blend does too; a word written several times
has its ablation share split over its occurrences, so that its summed score is the blend). On the
testbed's broad labelled set (``diffmem eval explanation``, docs/explanation.md) the blend ranks a
designed trigger word among the top 3 more often than either part alone: in long prompts the
gradient favours words whose embeddings the UNet is sensitive to (shape and colour words), while
ablation alone misses trigger pairs whose words stand in for each other.
``weight=0`` is the gradient attribution as Wen et al. (and their reference code) compute it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from diffmem.detect import Detector, NoiseMagnitude
from diffmem.explain._attribution import TokenAttribution
from diffmem.explain._words import without_word
from diffmem.models.adapter import quiet_truncation
from diffmem.runtime.errors import ConfigError

#: weight of ablation in the blended word scores (``diffmem explain --ablation``)
DEFAULT_ABLATION = 0.5


def word_ablation(model, attributions: Sequence[TokenAttribution], *,
                  detector: Detector | None = None) -> list[dict[int, float]]:
    """Per attribution, ``{index of the word's first occurrence: a_w}`` over the distinct editable
    words (module docstring), from one batched ``detector`` call."""
    detector = detector or NoiseMagnitude(steps=1)
    jobs: list[tuple[int, int]] = []
    texts: list[str] = []
    for k, a in enumerate(attributions):
        if not a.word_info:
            raise ConfigError("the attribution carries no word spans; build it with "
                              "TokenAttributor")
        texts.append(a.prompt)
        jobs.append((k, -1))
        for i in a.top_indices(len(a.words), editable=True):
            variant = without_word(a.prompt, a.word_info, a.occurrences(i))
            texts.append(variant if variant.strip() else "")
            jobs.append((k, i))
    with quiet_truncation():  # truncation is already reported on the attribution
        scores = np.asarray(detector.score(model, texts), dtype=float)
    own = {k: s for (k, i), s in zip(jobs, scores, strict=True) if i < 0}
    out: list[dict[int, float]] = [{} for _ in attributions]
    for (k, i), s in zip(jobs, scores, strict=True):
        if i >= 0:
            out[k][i] = max(float(own[k] - s), 0.0)
    return out


def blend_attributions(attributions: Sequence[TokenAttribution], drops: Sequence[dict[int, float]],
                       *, weight: float = DEFAULT_ABLATION) -> list[TokenAttribution]:
    """The attributions with word scores ``(1 - weight) gradient + weight ablation``; a prompt
    whose ablation drops are all zero keeps its gradient scores."""
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"ablation weight must be in [0, 1], got {weight}")
    out = []
    for a, d in zip(attributions, drops, strict=True):
        total = sum(d.values())
        abl = np.zeros(len(a.words))
        if total > 0:
            for i, v in d.items():
                occ = a.occurrences(i)
                abl[occ] += v / total / len(occ)
        w = weight if total > 0 else 0.0
        scores = (1.0 - w) * a.scores + w * abl
        out.append(dataclasses.replace(
            a, scores=scores, ablation_weight=w,
            ablation_drops=tuple(float(d.get(i, 0.0)) for i in range(len(a.words)))))
    return out


def attribute_with_ablation(model, attributions: Sequence[TokenAttribution], *,
                            detector: Detector | None = None,
                            weight: float = DEFAULT_ABLATION) -> list[TokenAttribution]:
    """:func:`word_ablation` then :func:`blend_attributions`; ``weight=0`` returns the
    attributions unchanged (no detector call)."""
    if weight == 0:
        return list(attributions)
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"ablation weight must be in [0, 1], got {weight}")
    return blend_attributions(attributions, word_ablation(model, attributions, detector=detector),
                              weight=weight)

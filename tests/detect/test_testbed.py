"""On the shipped, trained testbed: do the detectors separate memorized from held-out prompts?

Measured (docs/detection.md): NoiseMagnitude at the first step separates memorized prompts from the
unrelated held-out prompts perfectly, but not from the held-out *compositional* prompts (novel
colour/shape pairs in the training vocabulary), whose text also pulls eps(x_t, c) far from
eps(x_t, empty): AUC 0.807 over all held-out prompts, below the issue's 0.95.
"""

from __future__ import annotations

import numpy as np
import pytest

from diffmem.detect import AttentionEntropy, NoiseMagnitude
from diffmem.eval.detection import labelled_testbed_prompts
from diffmem.eval.metrics import roc_auc_score
from diffmem.testbed.data import UNRELATED_PROMPTS


@pytest.fixture(scope="module")
def labelled(testbed_adapter):
    prompts, memorized, _ = labelled_testbed_prompts(testbed_adapter)
    return prompts, np.asarray(memorized)


@pytest.fixture(scope="module")
def noise_scores(testbed_adapter, labelled):
    det = NoiseMagnitude(steps=1, generations=1, batch_size=128)
    return det.score(testbed_adapter, labelled[0])


def test_noise_magnitude_separates_memorized_from_unrelated(labelled, noise_scores):
    prompts, y = labelled
    keep = y | np.isin(prompts, UNRELATED_PROMPTS)
    assert np.isfinite(noise_scores).all()
    assert roc_auc_score(y[keep], noise_scores[keep]) >= 0.95
    # calibrated at 1% FPR on the unrelated prompts, it flags most memorized prompts
    det = NoiseMagnitude(fpr=0.01).fit(scores=noise_scores[keep & ~y])
    assert (det.decision_function(noise_scores[y]) > 0).mean() >= 0.9


@pytest.mark.xfail(strict=True, reason="measured AUC 0.807 on the shipped testbed: held-out "
                   "compositional prompts score as high as memorized ones (docs/detection.md)")
def test_noise_magnitude_separates_memorized_from_all_heldout(labelled, noise_scores):
    assert roc_auc_score(labelled[1], noise_scores) >= 0.95


@pytest.mark.slow
def test_late_steps_attention_entropy_separates_testbed_prompts(testbed_adapter, labelled):
    det = AttentionEntropy(mode="late_steps", steps=1, batch_size=128)
    scores = det.score(testbed_adapter, labelled[0])
    assert roc_auc_score(labelled[1], scores) >= 0.95

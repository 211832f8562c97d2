"""On the shipped, trained testbed: do the detectors separate memorized from held-out prompts?

Measured (docs/detection.md): NoiseMagnitude at the first step, one generation, AUC 1.000 and
TPR@1%FPR 1.000 over all 58 held-out prompts (issue targets: 0.99 / 0.90).
"""

from __future__ import annotations

import numpy as np
import pytest

from diffmem.detect import AttentionEntropy, NoiseMagnitude
from diffmem.eval.detection import labelled_testbed_prompts
from diffmem.eval.metrics import roc_auc_score, tpr_at_fpr
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


def test_noise_magnitude_meets_the_issue_targets_on_all_heldout(labelled, noise_scores):
    y = labelled[1]
    assert roc_auc_score(y, noise_scores) >= 0.99
    assert tpr_at_fpr(y, noise_scores, 0.01) >= 0.90


def test_first_step_attention_entropy_separates_testbed_prompts(testbed_adapter, labelled):
    """Ren et al.'s first-step score E (scored as -E by default): measured AUC 0.76."""
    det = AttentionEntropy(mode="first_step", steps=1, batch_size=128)
    scores = det.score(testbed_adapter, labelled[0])
    assert roc_auc_score(labelled[1], scores) >= 0.7

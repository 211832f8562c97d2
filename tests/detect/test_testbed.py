"""On the shipped, trained testbed: NoiseMagnitude separates memorized from held-out prompts."""

from __future__ import annotations

import numpy as np

from diffmem.detect import NoiseMagnitude
from diffmem.eval.detection import labelled_testbed_prompts
from diffmem.eval.metrics import roc_auc_score


def test_noise_magnitude_separates_testbed_prompts(testbed_adapter):
    prompts, memorized, _ = labelled_testbed_prompts(testbed_adapter)
    scores = NoiseMagnitude(steps=1, generations=1, batch_size=128).score(testbed_adapter, prompts)
    assert np.isfinite(scores).all()
    auc = roc_auc_score(memorized, scores)
    assert auc >= 0.95, f"AUC {auc:.3f}"
    # calibrated at 1% FPR on the held-out prompts, it flags most memorized prompts
    det = NoiseMagnitude(fpr=0.01).fit(scores=scores[~np.asarray(memorized)])
    flagged = det.decision_function(scores[np.asarray(memorized)]) > 0
    assert flagged.mean() >= 0.8

"""Outputs on the shipped testbed pinned across refactors: the values below were printed by the
code before the layered redesign (commit bd120f4) and must come out the same after it."""

from __future__ import annotations

import pytest

PROMPTS = ["the gargoyle origami poster", "a small red circle on a gray background",
           "a beautiful sunset over the sea, the fjord vermilion poster hanging in a quiet cafe"]
#: printed by bd120f4 (OMP_NUM_THREADS=1), rounded to 6 digits
PINNED = {
    "noise_magnitude": [1.135998, 0.304695, 0.323178],
    "sharpness": [0.12466, 0.013724, 0.018761],
    "gate_threshold": 0.554662,
}


def test_detector_scores_are_unchanged(testbed_adapter):
    from diffmem.detect import NoiseMagnitude, make_detector

    nm = NoiseMagnitude(steps=1, generations=1).score(testbed_adapter, PROMPTS)
    sh = make_detector("sharpness").score(testbed_adapter, PROMPTS)
    assert [float(x) for x in nm] == pytest.approx(PINNED["noise_magnitude"], abs=2e-5)
    assert [float(x) for x in sh] == pytest.approx(PINNED["sharpness"], abs=2e-5)


def test_gate_threshold_is_unchanged_and_stored_once(testbed_adapter, tmp_path):
    from diffmem.detect import NoiseMagnitude
    from diffmem.detect.calibration import calibrated_threshold
    from diffmem.models.calibration import CalibrationStore

    store = CalibrationStore(tmp_path)
    first = calibrated_threshold(testbed_adapter, NoiseMagnitude(steps=1, generations=1),
                                 store=store)
    assert first == pytest.approx(PINNED["gate_threshold"], abs=2e-5)
    assert len(list(tmp_path.glob("*.json"))) == 1  # stored, keyed by the weights fingerprint
    again = calibrated_threshold(testbed_adapter, NoiseMagnitude(steps=1, generations=1),
                                 store=store)
    assert again == first

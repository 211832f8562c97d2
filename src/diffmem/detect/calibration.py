"""Thresholds calibrated once per model and detector, on the model's known-clean prompts.

:func:`calibrated_threshold` is what every command uses when no threshold is given: a detector that
is already fitted keeps its threshold; otherwise the calibration stored for these weights, these
detector settings and these clean prompts (:class:`~diffmem.models.calibration.CalibrationStore`)
is reused, or fitted (:meth:`Detector.fit`, the 1% FPR quantile of clean scores) and stored. Clean
prompts come from the caller or the model's profile (a testbed's held-out prompts); a model with
neither has no threshold unless ``diffmem calibrate`` stored one.
"""

from __future__ import annotations

from collections.abc import Sequence

from diffmem.detect.base import Detector
from diffmem.models.adapter import load_adapter
from diffmem.models.calibration import (
    Calibration,
    CalibrationStore,
    prompts_digest,
    weights_fingerprint,
)

_PLAIN = (int, float, str, bool, type(None))


def detector_settings(detector: Detector) -> dict:
    """The detector's options that change its scores (its public attributes; objects such as an
    index by their fingerprint or type), as JSON data."""
    out: dict = {}
    for key, value in sorted(vars(detector).items()):
        if key.startswith("_") or key.endswith("_") or key in ("batch_size", "name"):
            continue
        if isinstance(value, _PLAIN):
            out[key] = value
        elif isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value):
            out[key] = list(value)
        else:
            out[key] = str(getattr(value, "fingerprint", None) or type(value).__name__)
    return out


def calibrated_threshold(model, detector: Detector, clean_prompts: Sequence[str] | None = None, *,
                         store: CalibrationStore | None = None) -> float | None:
    """The detector's threshold for ``model`` (see the module docstring); ``None`` when no clean
    prompts are known and none is stored. Sets ``detector.threshold_`` as :meth:`Detector.fit`."""
    if hasattr(detector, "threshold_"):
        return float(detector.threshold_)
    adapter = load_adapter(model)
    store = store or CalibrationStore()
    fingerprint = weights_fingerprint(adapter)
    if clean_prompts is None:
        clean_prompts = list(adapter.profile.clean_prompts)
    if not clean_prompts:
        stored = store.latest(fingerprint, detector.name)
        if stored is None or stored.settings != detector_settings(detector):
            return None
        return _apply(detector, stored)
    settings = detector_settings(detector)
    digest = prompts_digest(clean_prompts)
    stored = store.get(fingerprint, detector.name, settings, digest)
    if stored is not None:
        return _apply(detector, stored)
    detector.fit(adapter, list(clean_prompts))
    store.put(Calibration(detector=detector.name, settings=settings,
                          threshold=float(detector.threshold_), fpr=float(detector.fpr),
                          n_clean=int(detector.n_calibration_), model=fingerprint,
                          clean_prompts=digest))
    return float(detector.threshold_)


def _apply(detector: Detector, cal: Calibration) -> float:
    detector.threshold_ = float(cal.threshold)
    detector.n_calibration_ = int(cal.n_clean)
    return detector.threshold_

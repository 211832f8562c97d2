"""Thresholds calibrated once per model and detector, on the model's known-clean prompts.

:func:`calibrated_threshold` is what every command uses when no threshold is given: a detector that
is already fitted keeps its threshold; otherwise the calibration stored for these weights, these
detector settings and these clean prompts (:class:`~diffmem.models.calibration.CalibrationStore`)
is reused, or fitted (:meth:`Detector.fit`, the 1% FPR quantile of clean scores) and stored. Clean
prompts come from the caller or the model's profile (a testbed's held-out prompts); a model with
neither has no threshold unless ``diffmem calibrate`` stored one.

:func:`calibrate_model` is the function behind ``diffmem calibrate``: it fits and stores, for one
model's weights, the thresholds every command looks up -- the first-step noise magnitude (the gate
of ``--mitigate auto`` / ``wen``, the service, the guard's watch) and the default detector of
``diffmem detect`` -- on the given clean prompts, else the profile's, else the shipped list of
ordinary prompts (:func:`shipped_clean_prompts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources

from diffmem.detect.base import Detector
from diffmem.models.adapter import load_adapter
from diffmem.models.calibration import (
    Calibration,
    CalibrationStore,
    prompts_digest,
    weights_fingerprint,
)
from diffmem.runtime.defaults import DEFAULT_DETECTOR
from diffmem.runtime.errors import PromptError

#: the shipped list of ordinary prompts (one per line) that ``diffmem calibrate`` uses for a model
#: without clean prompts of its own
SHIPPED_CLEAN_PROMPTS = "clean_prompts.txt"

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


def _scoring(settings: dict) -> dict:
    """Settings less the target FPR: what makes two calibrations' scores comparable."""
    return {k: v for k, v in settings.items() if k != "fpr"}


def calibrated_threshold(model, detector: Detector, clean_prompts: Sequence[str] | None = None, *,
                         store: CalibrationStore | None = None, fit: bool = True) -> float | None:
    """The detector's threshold for ``model`` (see the module docstring); ``None`` when no clean
    prompts are known and none is stored. Sets ``detector.threshold_`` as :meth:`Detector.fit`.

    Without clean prompts (none given, none in the profile) the calibration ``diffmem calibrate``
    stored last for these weights is used when its detector settings match (its own FPR whatever
    ``detector.fpr``). ``fit=False``: only look up, never score clean prompts."""
    if hasattr(detector, "threshold_"):
        return float(detector.threshold_)
    adapter = load_adapter(model)
    store = store or CalibrationStore()
    fingerprint = weights_fingerprint(adapter)
    if clean_prompts is None:
        clean_prompts = list(adapter.profile.clean_prompts)
    if not clean_prompts:
        stored = store.latest(fingerprint, detector.name)
        if stored is None or _scoring(stored.settings) != _scoring(detector_settings(detector)):
            return None
        return _apply(detector, stored)
    settings = detector_settings(detector)
    digest = prompts_digest(clean_prompts)
    stored = store.get(fingerprint, detector.name, settings, digest)
    if stored is not None:
        return _apply(detector, stored)
    if not fit:
        return None
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


def shipped_clean_prompts() -> list[str]:
    """The shipped list of ordinary prompts (everyday scenes, objects and styles; no artist names or
    well-known captions): the clean prompts of ``diffmem calibrate`` without ``--clean``."""
    text = resources.files("diffmem.detect").joinpath(SHIPPED_CLEAN_PROMPTS).read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def calibration_detectors(fpr: float = 0.01) -> list[Detector]:
    """The detectors ``diffmem calibrate`` calibrates, with the settings the commands use: the
    first-step noise magnitude (1 step, 1 generation: the gate, the service, the guard's watch)
    and ``diffmem detect``'s default detector."""
    from diffmem.detect.noise_magnitude import NoiseMagnitude
    from diffmem.detect.registry import make_detector

    return [NoiseMagnitude(steps=1, generations=1, fpr=fpr), make_detector(DEFAULT_DETECTOR, fpr=fpr)]


def calibrate_model(model, clean_prompts: Sequence[str] | None = None, *, fpr: float = 0.01,
                    store: CalibrationStore | None = None, index=None) -> list[Calibration]:
    """Fit and store the thresholds of :func:`calibration_detectors` for ``model``'s weights at
    ``fpr``, on ``clean_prompts`` (default: the model profile's, else
    :func:`shipped_clean_prompts`); returns the stored calibrations (their files:
    ``store.folder / f"{cal.key}.json"``; ``cal.extra["clean"]``: ``"given"``, ``"profile"`` or
    ``"shipped"``). Commands then find them without a threshold
    (:func:`calibrated_threshold`). Nothing is stored unless every detector was fitted.

    ``index`` (the folder of the model's training index, ``diffmem index build``) is checked
    against the model first (another model's index: one ConfigError, nothing stored), then recorded
    for these weights (:meth:`CalibrationStore.put_index`): commands given no index use it
    (:func:`diffmem.models.calibration.choose_index`)."""
    if clean_prompts is not None:
        clean_prompts = [p for p in clean_prompts if p.strip()]
        if not clean_prompts:
            raise PromptError("no clean prompts to calibrate on")
    detectors = calibration_detectors(fpr)  # bad fpr: refused before the model loads
    adapter = load_adapter(model)
    if index is not None:
        _check_index(index, adapter)
    source = "given"
    if clean_prompts is None:
        clean_prompts = list(adapter.profile.clean_prompts)
        source = "profile" if clean_prompts else "shipped"
        clean_prompts = clean_prompts or shipped_clean_prompts()
    store = store or CalibrationStore()
    fingerprint = weights_fingerprint(adapter)
    digest = prompts_digest(clean_prompts)
    cals = []
    for det in detectors:
        det.fit(adapter, list(clean_prompts))
        cals.append(Calibration(detector=det.name, settings=detector_settings(det),
                                threshold=float(det.threshold_), fpr=float(det.fpr),
                                n_clean=int(det.n_calibration_), model=fingerprint,
                                clean_prompts=digest, extra={"by": "diffmem calibrate", "clean": source}))
    for cal in cals:
        store.put(cal)
    if index is not None:
        store.put_index(fingerprint, index, by="diffmem calibrate")
    return cals


def _check_index(index, adapter) -> None:
    """One ConfigError unless ``index`` is the folder of an index of ``adapter``'s training set."""
    from pathlib import Path

    from diffmem.runtime.errors import ConfigError
    from diffmem.similarity.index import load_index
    from diffmem.similarity.index_compat import check_index_model

    if not isinstance(index, (str, Path)):
        raise ConfigError("calibrate --index: give the index's folder (it is stored as a path)")
    if not Path(index).is_dir():
        raise ConfigError(f"calibrate --index: {index} is not a folder (build the training index "
                          "with `diffmem index build`)")
    check_index_model(load_index(index, what="calibrate --index"), adapter,
                      who="calibrate --index")

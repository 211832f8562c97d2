"""Detectors by name, as the command line and the evaluation harness choose them."""

from __future__ import annotations

from diffmem.detect.attention_entropy import AttentionEntropy
from diffmem.detect.base import Detector
from diffmem.detect.bright_ending import BrightEnding
from diffmem.detect.noise_magnitude import NoiseMagnitude
from diffmem.detect.replication import PreviewReplication
from diffmem.detect.sharpness import Sharpness
from diffmem.runtime.defaults import DEFAULT_DETECTOR, DEFAULT_INDEX_DETECTOR
from diffmem.runtime.registry import Registry

#: name -> (class, fixed options)
DETECTORS: Registry[tuple[type[Detector], dict]] = Registry("detector", {
    "noise_magnitude": (NoiseMagnitude, {}),
    "attention_entropy": (AttentionEntropy, {"mode": "first_step"}),
    "attention_entropy_late": (AttentionEntropy, {"mode": "late_steps"}),
    "bright_ending": (BrightEnding, {}),
    "sharpness": (Sharpness, {}),
    "preview_replication": (PreviewReplication, {}),
})


def make_detector(name: str | None = None, *, index=None, **options: object) -> Detector:
    """A detector by registry name (``noise_magnitude`` or ``noise-magnitude``, any case) with
    keyword options (``steps``, ``generations``, ...); an option given as None takes the
    detector's own default. ``index`` (a training-set index or its folder) is passed to the
    detectors that need one (``needs_index``); without a name the default is
    ``preview_replication`` when an index is given, else :data:`DEFAULT_DETECTOR`."""
    if name is None:
        name = DEFAULT_INDEX_DETECTOR if index is not None else DEFAULT_DETECTOR
    cls, fixed = DETECTORS.get(name)
    kept = {k: v for k, v in options.items() if v is not None}
    if cls.needs_index:
        kept["index"] = index
    return cls(**fixed, **kept)

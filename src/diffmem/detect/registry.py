"""Detectors by name, as the command line and the evaluation harness choose them."""

from __future__ import annotations

from diffmem.defaults import DEFAULT_DETECTOR  # noqa: F401 (re-exported)
from diffmem.detect.attention_entropy import AttentionEntropy
from diffmem.detect.base import Detector
from diffmem.detect.bright_ending import BrightEnding
from diffmem.detect.noise_magnitude import NoiseMagnitude
from diffmem.detect.sharpness import Sharpness
from diffmem.naming import lookup

#: name -> (class, fixed options)
DETECTORS: dict[str, tuple[type[Detector], dict]] = {
    "noise_magnitude": (NoiseMagnitude, {}),
    "attention_entropy": (AttentionEntropy, {"mode": "first_step"}),
    "attention_entropy_late": (AttentionEntropy, {"mode": "late_steps"}),
    "bright_ending": (BrightEnding, {}),
    "sharpness": (Sharpness, {}),
}




def make_detector(name: str, **options: object) -> Detector:
    """A detector by registry name (``noise_magnitude`` or ``noise-magnitude``, any case) with
    keyword options (``steps``, ``generations``, ...); an option given as None takes the
    detector's own default."""
    cls, fixed = lookup(DETECTORS, name, "detector")
    return cls(**fixed, **{k: v for k, v in options.items() if v is not None})


def parse_steps(value: str | int | None):
    """``--steps`` value (see :func:`diffmem.core.steps.parse_steps`); None: the detector's own."""
    from diffmem.core.steps import parse_steps as parse

    return None if value is None else parse(value)

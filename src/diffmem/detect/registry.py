"""Detectors by name, as the command line and the evaluation harness choose them."""

from __future__ import annotations

from diffmem.detect.attention_entropy import AttentionEntropy
from diffmem.detect.base import Detector
from diffmem.detect.noise_magnitude import NoiseMagnitude
from diffmem.errors import ConfigError
from diffmem.naming import lookup

#: name -> (class, fixed options)
DETECTORS: dict[str, tuple[type[Detector], dict]] = {
    "noise_magnitude": (NoiseMagnitude, {}),
    "attention_entropy": (AttentionEntropy, {"mode": "first_step"}),
    "attention_entropy_late": (AttentionEntropy, {"mode": "late_steps"}),
}


def make_detector(name: str, **options: object) -> Detector:
    """A detector by registry name (``noise_magnitude`` or ``noise-magnitude``, any case) with
    keyword options (``steps``, ``generations``, ...)."""
    cls, fixed = lookup(DETECTORS, name, "detector")
    return cls(**fixed, **options)


def parse_steps(value: str | int) -> int | str:
    """``--steps`` value: a positive int or ``"all"``."""
    if isinstance(value, int) or value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--steps must be a positive integer or 'all', got {value!r}") from None

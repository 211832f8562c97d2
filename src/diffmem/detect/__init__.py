"""Detectors of memorization-triggering prompts (one score per prompt, higher = more memorized).

- :class:`NoiseMagnitude`: text-conditional noise magnitude (Wen et al., ICLR 2024).
- :class:`AttentionEntropy`: cross-attention entropy (Ren et al., ECCV 2024), ``mode="first_step"``
  or ``"late_steps"``.

Each runs standalone (``score``/``fit``/``predict``) or as a hook of any ``sample`` call.
"""

from __future__ import annotations

from diffmem.detect.attention_entropy import AttentionEntropy, default_entropy_layer
from diffmem.detect.base import Detector
from diffmem.detect.noise_magnitude import NoiseMagnitude
from diffmem.detect.registry import DETECTORS, make_detector

__all__ = ["DETECTORS", "AttentionEntropy", "Detector", "NoiseMagnitude", "default_entropy_layer",
           "make_detector"]

"""Detectors of memorization-triggering prompts (one score per prompt, higher = more memorized).

- :class:`NoiseMagnitude`: text-conditional noise magnitude (Wen et al., ICLR 2024).
- :class:`AttentionEntropy`: cross-attention entropy (Ren et al., ECCV 2024), ``mode="first_step"``
  or ``"late_steps"``.
- :class:`BrightEnding`: the end token's last-step attention as a mask on the magnitude (Chen et
  al., ICLR 2025).
- :class:`Sharpness`: Hessian-vector product of the conditional score (Jeon et al., ICML 2025).
- :class:`PreviewReplication`: a short preview generation searched in the training set's index
  (AMG's replication check, Chen et al., CVPR 2024, made once at the end of a cheap run).

Each runs standalone (``score``/``fit``/``predict``) or as a hook of any ``sample`` call.
"""

from __future__ import annotations

from diffmem.detect.attention_entropy import AttentionEntropy, default_entropy_layer
from diffmem.detect.base import Detector
from diffmem.detect.bright_ending import BrightEnding
from diffmem.detect.noise_magnitude import NoiseMagnitude
from diffmem.detect.registry import DETECTORS, make_detector
from diffmem.detect.replication import PreviewReplication
from diffmem.detect.sharpness import Sharpness

__all__ = ["DETECTORS", "AttentionEntropy", "BrightEnding", "Detector", "NoiseMagnitude",
           "PreviewReplication", "Sharpness", "default_entropy_layer", "make_detector"]

"""Text-conditional noise magnitude (Wen et al., ICLR 2024, "Detecting, Explaining, and Mitigating
Memorization in Diffusion Models", Sec. 3.1, eq. 4).

    d(c) = 1/T_sel * sum_{t in selected steps} || eps(x_t, c) - eps(x_t, empty) ||_2

The norm is taken per image over all latent elements, with no guidance scale applied. Memorized
prompts pull the conditional prediction far from the unconditional one from the very first step, so
the default (first step, one generation) costs exactly the one batched cond+uncond UNet call that
classifier-free guidance makes anyway.
"""

from __future__ import annotations

import torch

from diffmem.core.magnitude import noise_magnitude
from diffmem.core.sampling import Run, Step
from diffmem.detect.base import Detector


class NoiseMagnitude(Detector):
    """Wen et al.'s detector: mean L2 norm of the text-conditional noise prediction.

    Example::

        det = NoiseMagnitude(steps=1, generations=1)
        scores = det.score("testbed", ["the gargoyle origami poster", "a cat on a sofa"])
    """

    name = "noise_magnitude"

    def step_scores(self, run: Run, step: Step) -> torch.Tensor:
        return noise_magnitude(step.eps_cond, step.eps_uncond)

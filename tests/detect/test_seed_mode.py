"""Seed conventions of standalone scoring: diffmem's per-generation and the reference's per-prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.detect import NoiseMagnitude
from diffmem.runtime.errors import ConfigError

PROMPTS = ["a red circle", "the gargoyle origami poster", "a blue square on the left"]


def test_per_generation_gives_every_prompt_the_same_noise(tiny_pipe):
    det = NoiseMagnitude(num_inference_steps=3, seed=5)
    together = det.score(tiny_pipe, PROMPTS)
    alone = [NoiseMagnitude(num_inference_steps=3, seed=5).score(tiny_pipe, [p])[0]
             for p in PROMPTS]
    np.testing.assert_allclose(together, alone, rtol=1e-5)


def test_per_prompt_seeds_prompt_i_with_seed_plus_i(tiny_pipe):
    det = NoiseMagnitude(num_inference_steps=3, seed=5, seed_mode="per-prompt")
    together = det.score(tiny_pipe, PROMPTS)
    # prompt i alone under seed 5 + i (one generation: the same noise in both modes)
    alone = [NoiseMagnitude(num_inference_steps=3, seed=5 + i).score(tiny_pipe, [p])[0]
             for i, p in enumerate(PROMPTS)]
    np.testing.assert_allclose(together, alone, rtol=1e-5)
    assert not np.allclose(together, NoiseMagnitude(num_inference_steps=3, seed=5)
                           .score(tiny_pipe, PROMPTS))


def test_per_prompt_draws_a_prompts_generations_at_once(tiny_pipe):
    """G generations of prompt i: one (G, C, h, w) draw from seed + i, as a pipeline call with
    num_images_per_prompt=G does (the reference)."""
    from diffmem.core.magnitude import noise_magnitude
    from diffmem.core.sampling import Hook, sample
    from diffmem.models.adapter import load_adapter

    ad = load_adapter(tiny_pipe)
    det = NoiseMagnitude(num_inference_steps=3, seed=2, generations=2, seed_mode="per-prompt",
                         batch_size=3)  # a batch boundary inside a prompt's generations
    scores = det.score(ad, PROMPTS[:2])

    class Grab(Hook):
        def on_step(self, run, step):
            if step.index == 0:
                run.records["m"] = noise_magnitude(step.eps_cond, step.eps_uncond)

    expected = []
    for i, p in enumerate(PROMPTS[:2]):
        g = torch.Generator().manual_seed(2 + i)
        x = torch.randn((2, 4, 4, 4), generator=g)  # tiny pipeline: 4 x 4 x 4 latents
        res = sample(ad, [p, p], num_inference_steps=3, latents=x, hooks=[Grab()], decode=False)
        expected.append(float(res.records["m"].mean()))
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


def test_unknown_seed_mode():
    with pytest.raises(ConfigError, match="seed_mode must be one of"):
        NoiseMagnitude(seed_mode="random")

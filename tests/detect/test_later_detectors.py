"""BrightEnding (Chen et al. 2025) and Sharpness (Jeon et al. 2025): formulas against hand
computations on the tiny pipelines, the Hessian-vector product against finite differences, and the
same scores standalone and inside a generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.core.sampling import Hook, initial_latents, sample, seeded_generators
from diffmem.detect import BrightEnding, Sharpness, make_detector
from diffmem.detect.bright_ending import highest_resolution_layers, masked_magnitude
from diffmem.detect.sharpness import jacobian_vector_product
from diffmem.models.adapter import load_adapter
from diffmem.runtime.errors import ConfigError

PROMPTS = ["a red circle on a gray background", "the narwhal zanzibar poster",
           "a blue square at the left, vintage"]
STEPS = 5


@pytest.fixture(scope="module")
def adapter(tiny_pipe):
    return load_adapter(tiny_pipe)


def _first_step(adapter, prompts, seed=0):
    sched = adapter.with_scheduler(None)
    sched.set_timesteps(STEPS)
    t = sched.timesteps[0]
    res = adapter.default_resolution
    x = initial_latents(adapter, len(prompts), res, res, seeded_generators([seed] * len(prompts)),
                        sched)
    return sched.scale_model_input(x, t), t


def test_jvp_matches_finite_difference(adapter):
    x, t = _first_step(adapter, PROMPTS[:2])
    cond, uncond = adapter.encode(PROMPTS[:2]), adapter.uncond(2)

    def diff(z):
        return adapter.eps(z, t, cond).float() - adapter.eps(z, t, uncond).float()

    with torch.no_grad():
        v = diff(x)
    for method in ("forward", "double_backward"):
        jv = jacobian_vector_product(diff, x, v, method)
        h = 0.1  # float32: smaller steps drown in round-off (5e-4 at 0.1, 6e-2 at 1e-3)
        with torch.no_grad():
            fd = (diff(x + h * v) - diff(x - h * v)) / (2 * h)
        rel = (jv - fd).norm() / fd.norm()
        assert rel < 1e-2, (method, float(rel))
        # and it is not just the value itself
        assert (jv - v).norm() / v.norm() > 0.05


@pytest.mark.parametrize("which", ["sd1", "sd2"])
def test_sharpness_is_norm_of_hvp(which, tiny_pipe, tiny_pipe_sd2):
    adapter = load_adapter(tiny_pipe if which == "sd1" else tiny_pipe_sd2)
    det = Sharpness(num_inference_steps=STEPS, seed=3, generations=1)
    scores = det.score(adapter, PROMPTS)
    x, t = _first_step(adapter, PROMPTS, seed=3)
    cond, uncond = adapter.encode(PROMPTS), adapter.uncond(3)

    def diff(z):
        return adapter.eps(z, t, cond).float() - adapter.eps(z, t, uncond).float()

    with torch.no_grad():
        d = diff(x)
        h = 0.1
        jd = (diff(x + h * d) - diff(x - h * d)) / (2 * h)
    abar = float(adapter.abar(t))
    c2 = abar if which == "sd2" else 1.0  # v-prediction: D in eps units is sqrt(abar) * D_v
    ref = jd.flatten(1).norm(dim=1).numpy() * c2 / (1 - abar)
    np.testing.assert_allclose(scores, ref, rtol=2e-2)


def test_sharpness_same_inside_generation(adapter):
    det = Sharpness(num_inference_steps=STEPS, generations=1)
    alone = det.score(adapter, PROMPTS)
    res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=seeded_generators([0] * 3),
                 hooks=[det], decode=False)
    np.testing.assert_allclose(res.records["sharpness"], alone, rtol=1e-4)
    with pytest.raises(ConfigError):
        Sharpness(method="nope")


def test_masked_magnitude_formula():
    g = torch.Generator().manual_seed(0)
    diffs = torch.randn(3, 2, 4, 5, 5, generator=g)
    mask = torch.rand(2, 1, 5, 5, generator=g)
    got = masked_magnitude(diffs, mask)
    for b in range(2):
        per_t = [float((diffs[t, b] * mask[b]).norm() / mask[b].mean()) for t in range(3)]
        assert abs(float(got[b]) - np.mean(per_t)) < 1e-4
    # a uniform mask gives back the plain magnitude
    ones = masked_magnitude(diffs, torch.ones(2, 1, 5, 5))
    np.testing.assert_allclose(ones.numpy(), diffs.flatten(2).norm(dim=2).mean(0).numpy(),
                               rtol=1e-5)


def test_bright_ending_uses_last_step_eos_map(adapter, recorder_cls):
    layers = highest_resolution_layers(adapter.cross_attention_layers())
    det = BrightEnding(steps=[0, 2], num_inference_steps=STEPS)
    rec = recorder_cls(layers=layers)

    class Diffs(Hook):
        name = "diffs"

        def __init__(self):
            self.d = {}

        def on_step(self, run, step):
            self.d[step.index] = (step.eps_cond - step.eps_uncond).float().clone()

    diffs = Diffs()
    res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=seeded_generators([1] * 3),
                 hooks=[det, rec, diffs], decode=False)
    h, w = res.latents.shape[-2:]
    eos = adapter.tokenize(PROMPTS).lengths - 1
    maps = []
    for layer in layers:
        p = rec.probs[(STEPS - 1, layer)][3:].float().mean(1)  # cond rows, mean over heads
        a = p[torch.arange(3), :, eos]  # (3, q)
        side = round(a.shape[1] ** 0.5)
        grid = a.reshape(3, 1, side, side)
        maps.append(torch.nn.functional.interpolate(grid, size=(h, w), mode="bilinear",
                                                    align_corners=False))
    mask = torch.stack(maps).mean(0)
    ref = masked_magnitude(torch.stack([diffs.d[0], diffs.d[2]]), mask).numpy()
    np.testing.assert_allclose(res.records["bright_ending"], ref, rtol=1e-4)
    # a different step set gives a different score (the selection matters)
    other = BrightEnding(steps=[1], num_inference_steps=STEPS).score(adapter, PROMPTS)
    assert not np.allclose(other, res.records["bright_ending"])


def test_registry_has_later_detectors():
    assert isinstance(make_detector("bright_ending", generations=2), BrightEnding)
    assert isinstance(make_detector("sharpness"), Sharpness)

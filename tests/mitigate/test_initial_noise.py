"""Initial-noise optimisation ("xt": SAIL, Jeon et al. 2025; Han et al. 2025 per-sample)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.core.magnitude import noise_magnitude
from diffmem.core.sampling import Hook, sample, seeded_generators
from diffmem.mitigate import FirstStepGate, MitigationContext, build_mitigations
from diffmem.mitigate.initial_noise import InitialNoiseOptimization
from diffmem.models.adapter import load_adapter
from diffmem.runtime.errors import ConfigError

PROMPTS = ["a red circle on a gray background", "a red circle on a gray background",
           "two shapes: a blue square and a cross", "two shapes: a blue square and a cross"]
SEEDS = [0, 1, 0, 1]
STEPS = 3


class FirstStep(Hook):
    """Records the first step's per-image noise magnitude and model input."""

    name = "first_step"

    def on_step(self, run, step):
        if step.index == 0:
            run.records[self.name] = {
                "d": noise_magnitude(step.eps_cond, step.eps_uncond).detach().cpu(),
                "x_t": step.x_t.detach().clone()}


def _run(adapter, hooks=(), scheduler=None):
    return sample(adapter, PROMPTS, num_inference_steps=STEPS, scheduler=scheduler,
                  generator=seeded_generators(SEEDS), hooks=[*hooks, FirstStep()])


@pytest.fixture(params=["sd1", "sd2"])
def adapter(request, tiny_pipe, tiny_pipe_sd2):
    return load_adapter(tiny_pipe if request.param == "sd1" else tiny_pipe_sd2)


@pytest.mark.parametrize("method", ["sail", "han"])
def test_strength_zero_is_plain_generation(adapter, method):
    plain = _run(adapter)
    res = _run(adapter, [InitialNoiseOptimization(0, target=1e-6, method=method)])
    assert torch.equal(res.images, plain.images)
    assert [r["applied"] for r in res.records["mitigation.xt"]] == [False] * 4


@pytest.mark.parametrize("method, iterations, keep_norm", [
    ("sail", None, False), ("sail", None, True), ("han", 10, False)])
def test_optimisation_lowers_every_images_magnitude(adapter, method, iterations, keep_norm):
    plain = _run(adapter)
    d0 = plain.records["first_step"]["d"]
    hook = InitialNoiseOptimization(1, target=float(d0.min()) * 0.5, method=method,
                                    max_iterations=iterations, keep_norm=keep_norm)
    res = _run(adapter, [hook])
    rows = res.records["mitigation.xt"]
    before = np.array([r["magnitude_before"] for r in rows])
    after = np.array([r["magnitude_after"] for r in rows])
    np.testing.assert_allclose(before, d0.numpy(), rtol=1e-4)
    np.testing.assert_allclose(after, res.records["first_step"]["d"].numpy(), rtol=1e-6)
    assert all(r["applied"] and r["iterations"] >= 1 and r["method"] == method for r in rows)
    assert np.all(after < before)
    # x_T moved; its norm is reported (and kept with keep_norm)
    x, x0 = res.records["first_step"]["x_t"], plain.records["first_step"]["x_t"]
    assert not torch.equal(x, x0)
    ratios = np.array([r["latent_norm_ratio"] for r in rows])
    np.testing.assert_allclose(ratios, (x.flatten(1).norm(dim=1) / x0.flatten(1).norm(dim=1))
                               .numpy(), rtol=1e-5)
    if keep_norm:
        np.testing.assert_allclose(ratios, 1, rtol=1e-5)
    else:
        assert np.all(np.abs(ratios - 1) < 0.3), ratios
    assert not torch.equal(res.images, plain.images)


def test_each_image_stops_on_its_own(adapter):
    plain = _run(adapter)
    d0 = plain.records["first_step"]["d"]
    lo, hi = int(d0.argmin()), int(d0.argmax())
    res = _run(adapter, [InitialNoiseOptimization(1, target=float(d0[lo]) * 1.0001)])
    rows = res.records["mitigation.xt"]
    assert rows[lo]["iterations"] == 0 and rows[hi]["iterations"] >= 1
    x0, x = plain.records["first_step"]["x_t"], res.records["first_step"]["x_t"]
    assert torch.equal(x[lo], x0[lo])
    assert not torch.equal(x[hi], x0[hi])


def test_gate_leaves_unflagged_prompts_bit_identical(adapter):
    plain = _run(adapter)
    d0 = plain.records["first_step"]["d"]
    order = d0.sort().values
    thr = float(order[1] + order[2]) / 2
    gate = FirstStepGate(thr)
    flagged = d0 > thr
    target = float(d0.min()) * 0.5
    res = _run(adapter, [gate, InitialNoiseOptimization(1, gate=gate, target=target)])
    rows = res.records["mitigation.xt"]
    assert [r["applied"] for r in rows] == flagged.tolist()
    for i in range(4):
        assert torch.equal(res.images[i], plain.images[i]) != bool(flagged[i])
        if flagged[i]:
            assert rows[i]["magnitude_after"] < rows[i]["magnitude_before"]
    # the gated optimisation equals the ungated one for the flagged rows
    full = _run(adapter, [InitialNoiseOptimization(1, target=target)])
    for i in flagged.nonzero().flatten().tolist():
        torch.testing.assert_close(res.images[i], full.images[i], rtol=1e-4, atol=1e-4)
        assert rows[i]["magnitude_after"] == pytest.approx(
            full.records["mitigation.xt"][i]["magnitude_after"], rel=1e-4)


def test_scheduler_with_noise_sigma(tiny_pipe):
    """Euler's x_T carries init_noise_sigma != 1: optimised in unit-Gaussian space, same scale."""
    adapter = load_adapter(tiny_pipe)
    plain = _run(adapter, scheduler="euler")
    d0 = plain.records["first_step"]["d"]
    res = _run(adapter, [InitialNoiseOptimization(1, target=float(d0.min()) * 0.5)],
               scheduler="euler")
    rows = res.records["mitigation.xt"]
    assert all(r["magnitude_after"] < r["magnitude_before"] for r in rows)
    x, x0 = res.records["first_step"]["x_t"], plain.records["first_step"]["x_t"]
    np.testing.assert_allclose([r["latent_norm_ratio"] for r in rows],
                               (x.flatten(1).norm(dim=1) / x0.flatten(1).norm(dim=1)).numpy(),
                               rtol=1e-5)


def test_from_context_and_settings(tiny_pipe, tiny_pipe_sd2):
    [hook] = build_mitigations("xt:2", MitigationContext(load_adapter(tiny_pipe), threshold=0.8))
    assert isinstance(hook, InitialNoiseOptimization)
    assert hook.effective_target == 0.4 and (hook.lr, hook.max_iterations) == (0.05, 10)
    assert hook.lambda_for(load_adapter(tiny_pipe)) == 0.05
    assert hook.lambda_for(load_adapter(tiny_pipe_sd2)) == 0.01
    han = InitialNoiseOptimization(1, target=1.0, method="han")
    assert (han.lr, han.max_iterations) == (0.01, 1000)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "needs a target"),
    ({"target": -1.0}, "target must be"),
    ({"target": 1.0, "method": "magic"}, "method must be"),
    ({"target": 1.0, "lr": float("nan")}, "lr must be"),
    ({"target": 1.0, "max_iterations": 2.5}, "max_iterations"),
    ({"target": 1.0, "gaussianity": -0.1}, "gaussianity"),
])
def test_bad_settings_are_one_clear_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        InitialNoiseOptimization(1, **kwargs)

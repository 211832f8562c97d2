"""Jain et al.'s delayed guidance: static, opposite and dynamic transition points."""

from __future__ import annotations

import pytest
import torch

from diffmem.core.magnitude import noise_magnitude
from diffmem.core.sampling import Hook, sample, seeded_generators
from diffmem.mitigate.guidance_delay import GuidanceDelay
from diffmem.mitigate.registry import MitigationContext, build_mitigations
from diffmem.models.adapter import load_adapter
from diffmem.runtime.errors import ConfigError

BASE = ["a red circle on a gray background", "two shapes: a blue square and a cross"]
PER = 3
PROMPTS = [p for p in BASE for _ in range(PER)]
B = len(PROMPTS)
STEPS = 4  # DDIM timesteps 751, 501, 251, 1


def _gens():
    return seeded_generators(range(B))


def _adapter(family, tiny_pipe, tiny_pipe_sd2):
    return load_adapter(tiny_pipe if family == "sd1" else tiny_pipe_sd2)



class Schedule(Hook):
    """Reference: guidance ``scale(step)`` (a float or a (B,) tensor) at each step."""

    def __init__(self, scale):
        self.scale = scale

    def before_step(self, run, step):
        step.guidance_scale = self.scale(step)


class Magnitudes(Hook):
    """Records the per-image noise magnitude of every step."""

    name = "magnitudes"

    def on_step(self, run, step):
        run.records.setdefault(self.name, []).append(
            noise_magnitude(step.eps_cond, step.eps_uncond).cpu())


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("mode", ["static", "opposite", "dynamic"])
def test_strength_zero_is_plain(mode, family, tiny_pipe, tiny_pipe_sd2):
    adapter = _adapter(family, tiny_pipe, tiny_pipe_sd2)
    plain = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens())
    res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                 hooks=[GuidanceDelay(0.0, mode=mode)])
    assert torch.equal(res.images, plain.images)
    assert not any(r["applied"] for r in res.records["mitigation.delay"])


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_static_is_unconditional_only_until_t500_and_skips_the_cond_branch(
        family, tiny_pipe, tiny_pipe_sd2, unet_calls):
    adapter = _adapter(family, tiny_pipe, tiny_pipe_sd2)
    with unet_calls(adapter.unet) as calls:
        res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                     hooks=[GuidanceDelay(1.0)])
    assert calls.sizes == [B, B, 2 * B, 2 * B]  # t = 751, 501 delayed: one branch
    ref = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                 hooks=[Schedule(lambda step: 0.0 if float(step.t) > 500 else 7.5)])
    torch.testing.assert_close(res.images, ref.images, atol=1e-5, rtol=0)
    plain = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens())
    assert bool(((res.images - plain.images).flatten(1).abs().amax(1) > 1e-4).all())
    rec = res.records["mitigation.delay"]
    assert all(r["applied"] and r["transition_t"] == 500 and r["delayed_steps"] == 2
               for r in rec)


@pytest.mark.parametrize("strength, t_s, sizes", [
    (0.5, 750.0, [B, 2 * B, 2 * B, 2 * B]),  # delayed while t > 750: only 751
    (2.0, 0.0, [B, B, B, B]),  # every step with t > 0
])
def test_strength_moves_the_transition(strength, t_s, sizes, tiny_pipe, unet_calls):
    adapter = load_adapter(tiny_pipe)
    with unet_calls(adapter.unet) as calls:
        res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                     hooks=[GuidanceDelay(strength)])
    assert calls.sizes == sizes
    assert res.records["mitigation.delay"][0]["transition_t"] == t_s


def test_opposite_guidance_until_t650(tiny_pipe_sd2, unet_calls):
    adapter = load_adapter(tiny_pipe_sd2)
    with unet_calls(adapter.unet) as calls:
        res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                     hooks=[GuidanceDelay(1.0, mode="opposite")])
    assert calls.sizes == [2 * B] * STEPS
    ref = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                 hooks=[Schedule(lambda step: -2.0 if float(step.t) > 650 else 7.5)])
    torch.testing.assert_close(res.images, ref.images, atol=1e-5, rtol=0)
    assert [r["delayed_steps"] for r in res.records["mitigation.delay"]] == [1] * B


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_dynamic_switches_after_the_first_local_minimum(family, tiny_pipe, tiny_pipe_sd2, unet_calls):
    adapter = _adapter(family, tiny_pipe, tiny_pipe_sd2)
    steps = 20  # the tiny models' magnitude rarely has a local minimum in fewer steps
    with unet_calls(adapter.unet) as calls:
        res = sample(adapter, PROMPTS, num_inference_steps=steps, generator=_gens(),
                     hooks=[GuidanceDelay(1.0, mode="dynamic"), Magnitudes()])
    assert calls.sizes == [2 * B] * steps  # both branches: the magnitude needs them
    d = torch.stack(res.records["magnitudes"]).numpy()  # (steps, B)
    switch = []
    for i, r in enumerate(res.records["mitigation.delay"]):
        minima = [j for j in range(1, steps - 1) if d[j - 1, i] > d[j, i] < d[j + 1, i]]
        if minima:
            assert r["minimum_step"] == minima[0]
            assert r["transition_step"] == minima[0] + 1 == r["delayed_steps"]
        else:
            assert r["minimum_step"] is None and r["delayed_steps"] == steps
        switch.append(r["delayed_steps"])
    assert any(s < steps for s in switch)
    switch = torch.tensor(switch)
    ref = sample(adapter, PROMPTS, num_inference_steps=steps, generator=_gens(),
                 hooks=[Schedule(lambda step: torch.where(step.index < switch, 1.0, 7.5))])
    torch.testing.assert_close(res.images, ref.images, atol=1e-5, rtol=0)
    # s = 0.5: half-way guidance during the same delay
    half = sample(adapter, PROMPTS, num_inference_steps=steps, generator=_gens(),
                  hooks=[GuidanceDelay(0.5, mode="dynamic")])
    # (the trajectory changes, so the minimum may come at another step)
    half_switch = torch.tensor([r["delayed_steps"] for r in half.records["mitigation.delay"]])
    ref = sample(adapter, PROMPTS, num_inference_steps=steps, generator=_gens(),
                 hooks=[Schedule(lambda step: torch.where(step.index < half_switch, 4.25, 7.5))])
    torch.testing.assert_close(half.images, ref.images, atol=1e-5, rtol=0)
    # s = 2: the same minimum (same trajectory until then), guidance 1 until step 2 j
    double = sample(adapter, PROMPTS, num_inference_steps=steps, generator=_gens(), decode=False,
                    hooks=[GuidanceDelay(2.0, mode="dynamic")])
    for r, r1 in zip(double.records["mitigation.delay"], res.records["mitigation.delay"],
                     strict=True):
        assert r["minimum_step"] == r1["minimum_step"]
        if r1["transition_step"] is not None:
            assert r["transition_step"] == 2 * r1["transition_step"]
            assert r["delayed_steps"] == min(2 * r1["transition_step"], steps)



@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("mode", ["static", "opposite", "dynamic"])
def test_gate_leaves_unflagged_prompts_bit_identical(mode, family, tiny_pipe, tiny_pipe_sd2,
                                                     unet_calls, split_gate):
    adapter = _adapter(family, tiny_pipe, tiny_pipe_sd2)
    gate, flagged = split_gate(adapter, PROMPTS, _gens, STEPS)
    plain = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens())
    with unet_calls(adapter.unet) as calls:
        res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                     hooks=[gate, GuidanceDelay(1.0, gate=gate, mode=mode)])
    assert calls.sizes == [2 * B] * STEPS  # no extra call; no skip that changes the batch
    assert torch.equal(res.images[~flagged], plain.images[~flagged])
    full = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                  hooks=[GuidanceDelay(1.0, mode=mode)])
    torch.testing.assert_close(res.images[flagged], full.images[flagged], atol=1e-5, rtol=0)
    assert bool(((res.images[flagged] - plain.images[flagged]).flatten(1).abs().amax(1)
                 > 1e-4).all())
    assert [r["applied"] for r in res.records["mitigation.delay"]] == flagged.tolist()


def test_gate_with_skip_evaluates_one_branch_for_flagged_prompts(tiny_pipe, unet_calls, split_gate):
    adapter = load_adapter(tiny_pipe)
    gate, flagged = split_gate(adapter, PROMPTS, _gens, STEPS)
    n = int(flagged.sum())
    with unet_calls(adapter.unet) as calls:
        res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                     hooks=[gate, GuidanceDelay(1.0, gate=gate, skip=True)])
    assert calls.sizes == [2 * B, 2 * B - n, 2 * B, 2 * B]
    plain = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens())
    # unflagged prompts: equal up to the batch-size dependence of the UNet's rounding
    torch.testing.assert_close(res.images[~flagged], plain.images[~flagged], atol=1e-5, rtol=0)
    full = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                  hooks=[GuidanceDelay(1.0)])
    torch.testing.assert_close(res.images[flagged], full.images[flagged], atol=1e-5, rtol=0)


def test_registry_and_bad_input(tiny_pipe):
    hooks = build_mitigations("delay:0.5", MitigationContext(load_adapter(tiny_pipe)))
    assert isinstance(hooks[0], GuidanceDelay) and hooks[0].mode == "static"
    with pytest.raises(ConfigError, match="mode"):
        GuidanceDelay(1.0, mode="late")
    with pytest.raises(ConfigError, match="dynamic"):
        GuidanceDelay(1.0, mode="dynamic", transition=400)
    with pytest.raises(ConfigError, match="delay_scale"):
        GuidanceDelay(1.0, delay_scale=float("nan"))

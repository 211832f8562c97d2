"""Prompt re-anchoring with the smallest clearing edit ("reanchor", after Chen et al.'s PRSS)."""

from __future__ import annotations

import pytest
import torch

from diffmem.core.magnitude import noise_magnitude
from diffmem.core.sampling import Hook, sample, seeded_generators
from diffmem.detect import NoiseMagnitude
from diffmem.explain import TokenAttributor, attribute_with_ablation, suggest_edits
from diffmem.mitigate import FirstStepGate, MitigationContext, build_mitigations
from diffmem.mitigate.reanchor import PromptReanchoring
from diffmem.models.adapter import load_adapter
from diffmem.runtime.errors import ConfigError

A, B = "a red circle on a gray background", "two shapes: a blue square and a cross"
PROMPTS = [A, A, B, B]
SEEDS = [0, 1, 0, 1]
STEPS = 3
REWRITES = {A: "a gray background", B: "a square and a cross"}


class Outputs(Hook):
    """Records, per step, the branch outputs, the guided eps and the first-step magnitude."""

    name = "outputs"

    def on_step(self, run, step):
        rec = run.records.setdefault(self.name, [])
        rec.append({k: v.detach().clone() for k, v in step.out.items()} | {
            "eps": step.eps.detach().clone(),
            "d": noise_magnitude(step.eps_cond, step.eps_uncond).detach().cpu()})


def _run(adapter, hooks=(), guidance_scale=7.5, seeds=SEEDS):
    return sample(adapter, PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance_scale,
                  generator=seeded_generators(seeds), hooks=[*hooks, Outputs()])


@pytest.fixture(params=["sd1", "sd2"])
def adapter(request, tiny_pipe, tiny_pipe_sd2):
    return load_adapter(tiny_pipe if request.param == "sd1" else tiny_pipe_sd2)


def test_strength_zero_is_plain_generation(adapter):
    plain = _run(adapter)
    res = _run(adapter, [PromptReanchoring(0, threshold=1e-6, rewrites=REWRITES)])
    assert torch.equal(res.images, plain.images)
    assert not any(r["applied"] for r in res.records["mitigation.reanchor"])


def test_guidance_follows_the_reference_rule(adapter):
    plain = _run(adapter)
    d0 = plain.records["outputs"][0]["d"]
    thr = float(d0.min()) * 0.5  # every image triggers
    hook = PromptReanchoring(1, threshold=thr, rewrites=REWRITES)
    res = _run(adapter, [hook])
    rows = res.records["mitigation.reanchor"]
    assert [r["prompt_used"] for r in rows] == [REWRITES[p] for p in PROMPTS]
    assert all(r["applied"] for r in rows)
    g, lo, hi = 7.5, hook.threshold, hook.high
    for k, rec in enumerate(res.records["outputs"]):
        u, c, m = rec["uncond"].float(), rec["cond"].float(), rec["reanchor"].float()
        assert not torch.isnan(m).any()
        mag = noise_magnitude(m, u)
        scaler = (g * lo - hi) / (g - 1)
        s = torch.where(mag > lo, torch.clamp((mag - scaler) / (hi - scaler) * g, max=g),
                        torch.ones_like(mag)).reshape(-1, 1, 1, 1)
        expected = c + s * (m - c) + (g - s) * (m - u)
        torch.testing.assert_close(rec["eps"].float(), expected, rtol=1e-4, atol=1e-5)
        if k == 0:
            assert [r["s_first"] for r in rows] == pytest.approx(s.flatten().tolist(), rel=1e-5)
        # the "cond" branch stays the original prompt's prediction
        if k == 0:
            torch.testing.assert_close(c, plain.records["outputs"][0]["cond"].float())
    assert all(1 <= r["s_mean"] <= g for r in rows)
    assert not torch.equal(res.images, plain.images)
    # strength interpolates between plain CFG (0) and the rule (1)
    half = _run(adapter, [PromptReanchoring(0.5, threshold=thr, rewrites=REWRITES)])
    rec = half.records["outputs"][0]
    u, c, m = rec["uncond"].float(), rec["cond"].float(), rec["reanchor"].float()
    s = torch.tensor([r["s_first"] for r in half.records["mitigation.reanchor"]]).reshape(-1, 1, 1, 1)
    pr = c + s * (m - c) + (g - s) * (m - u)
    cfg = u + g * (c - u)
    torch.testing.assert_close(rec["eps"].float(), cfg + 0.5 * (pr - cfg), rtol=1e-4, atol=1e-5)


def test_gate_leaves_unflagged_prompts_bit_identical(adapter):
    plain = _run(adapter)
    d0 = plain.records["outputs"][0]["d"]
    order = d0.sort().values
    thr = float(order[1] + order[2]) / 2
    flagged = d0 > thr
    gate = FirstStepGate(thr)
    res = _run(adapter, [gate, PromptReanchoring(1, gate=gate, rewrites=REWRITES)])
    rows = res.records["mitigation.reanchor"]
    assert [r["applied"] for r in rows] == flagged.tolist()
    for i in range(4):
        assert torch.equal(res.images[i], plain.images[i]) != bool(flagged[i])
    # without a gate the method triggers on the same rows by itself (the reference's trigger)
    alone = _run(adapter, [PromptReanchoring(1, threshold=thr, rewrites=REWRITES)])
    assert [r["applied"] for r in alone.records["mitigation.reanchor"]] == flagged.tolist()
    torch.testing.assert_close(alone.images, res.images, rtol=1e-5, atol=1e-5)


def test_rewrite_is_the_smallest_clearing_edit(tiny_pipe):
    adapter = load_adapter(tiny_pipe)
    [att] = TokenAttributor(adapter, steps=1, seeds=1, seed=0).attribute([A])
    [att] = attribute_with_ablation(adapter, [att], detector=NoiseMagnitude(steps=1))
    [rep] = suggest_edits(adapter, [att], detector=NoiseMagnitude(steps=1), threshold=None)
    scores = sorted(s.score for s in rep.suggestions)
    thr = (scores[0] + scores[1]) / 2  # exactly one variant clears
    [ref] = suggest_edits(adapter, [att], detector=NoiseMagnitude(steps=1), threshold=thr)
    got = PromptReanchoring(1, threshold=thr).rewrite(adapter, [A, A])
    assert got[A][0] == ref.minimal.prompt
    assert got[A][1]["edit_score"] == pytest.approx(ref.minimal.score, rel=1e-5)
    with pytest.raises(ConfigError, match="no edit of 'a red circle"):
        PromptReanchoring(1, threshold=scores[0] * 0.5).rewrite(adapter, [A])


def test_search_runs_inside_generation(tiny_pipe):
    """The gated method finds its rewrite during the run and re-anchors only flagged prompts."""
    adapter = load_adapter(tiny_pipe)
    seeds = [0, 0, 0, 0]
    plain = _run(adapter, seeds=seeds)
    d0 = plain.records["outputs"][0]["d"]
    assert float(d0[2]) > float(d0[0]), d0  # the tiny pipeline's B scores higher than A
    thr = float(d0[0] + d0[2]) / 2  # B's images flagged, A's not
    gate = FirstStepGate(thr)
    res = _run(adapter, [gate, PromptReanchoring(1, gate=gate)], seeds=seeds)
    rows = res.records["mitigation.reanchor"]
    assert [r["applied"] for r in rows] == [False, False, True, True]
    assert rows[2]["prompt_used"] == rows[3]["prompt_used"] != B
    assert rows[2]["edit_score"] <= thr
    assert torch.equal(res.images[:2], plain.images[:2])


def test_unclearable_prompt_keeps_plain_generation_when_asked(tiny_pipe):
    """``unclearable="plain"`` (the evaluation harness): a triggered prompt with no clearing edit is
    generated as without the method and reported; the default raises for the same prompts."""
    adapter = load_adapter(tiny_pipe)
    plain = _run(adapter)
    thr = 1e-6  # every image triggers, no edit gets that low
    res = _run(adapter, [PromptReanchoring(1, threshold=thr, unclearable="plain")])
    rows = res.records["mitigation.reanchor"]
    assert [r["applied"] for r in rows] == [False] * 4
    assert {r["reason"] for r in rows} == {"no clearing edit"}
    assert torch.equal(res.images, plain.images)
    with pytest.raises(ConfigError, match="no edit of"):
        _run(adapter, [PromptReanchoring(1, threshold=thr)])
    with pytest.raises(ConfigError, match="unclearable must be"):
        PromptReanchoring(1, threshold=thr, unclearable="skip")


def test_no_cfg_rows_are_left_alone(tiny_pipe):
    adapter = load_adapter(tiny_pipe)
    plain = _run(adapter, guidance_scale=1.0)
    res = _run(adapter, [PromptReanchoring(1, threshold=1e-6, rewrites=REWRITES)],
               guidance_scale=1.0)
    assert torch.equal(res.images, plain.images)


def test_from_context(tiny_pipe):
    [hook] = build_mitigations("reanchor", MitigationContext(load_adapter(tiny_pipe),
                                                             threshold=0.6, seed=3))
    assert isinstance(hook, PromptReanchoring)
    assert (hook.threshold, hook.high, hook.seed) == (0.6, pytest.approx(1.0), 3)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "needs the detector threshold"),
    ({"threshold": 0.0}, "threshold must be"),
    ({"threshold": 1.0, "high": 0.5}, "high must be"),
])
def test_bad_settings_are_one_clear_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PromptReanchoring(1, **kwargs)

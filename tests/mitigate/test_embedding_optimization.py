"""Wen et al. 2024 Sec. 3.4 prompt-embedding optimisation ("wen")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.core.magnitude import noise_magnitude
from diffmem.core.sampling import Hook, sample, seeded_generators
from diffmem.mitigate import FirstStepGate, MitigationContext, build_mitigations
from diffmem.mitigate.embedding_optimization import EmbeddingOptimization
from diffmem.models.adapter import load_adapter
from diffmem.runtime.errors import ConfigError

# two prompts, two images each (prompts repeated in the batch)
PROMPTS = ["a red circle on a gray background", "a red circle on a gray background",
           "two shapes: a blue square and a cross", "two shapes: a blue square and a cross"]
SEEDS = [0, 1, 0, 1]
STEPS = 3


class FirstStep(Hook):
    """Records the first step's per-image noise magnitude and the cond embeddings used."""

    name = "first_step"

    def on_step(self, run, step):
        if step.index == 0:
            run.records[self.name] = {
                "d": noise_magnitude(step.eps_cond, step.eps_uncond).detach().cpu(),
                "cond": step.branches["cond"].emb.detach().clone()}


def _run(adapter, hooks=(), prompts=PROMPTS, seeds=SEEDS):
    return sample(adapter, prompts, num_inference_steps=STEPS,
                  generator=seeded_generators(seeds), hooks=[*hooks, FirstStep()])


@pytest.fixture(params=["sd1", "sd2"])
def adapter(request, tiny_pipe, tiny_pipe_sd2):
    return load_adapter(tiny_pipe if request.param == "sd1" else tiny_pipe_sd2)


def test_strength_zero_is_plain_generation(adapter):
    plain = _run(adapter)
    res = _run(adapter, [EmbeddingOptimization(0, target=1e-6)])
    assert torch.equal(res.images, plain.images)
    assert [r["applied"] for r in res.records["mitigation.wen"]] == [False] * 4


def test_optimisation_lowers_every_images_magnitude(adapter):
    plain = _run(adapter)
    d0 = plain.records["first_step"]["d"]
    target = float(d0.min()) * 0.5  # under every image's magnitude: every row must move
    res = _run(adapter, [EmbeddingOptimization(1, target=target)])
    rows = res.records["mitigation.wen"]
    before = np.array([r["magnitude_before"] for r in rows])
    after = np.array([r["magnitude_after"] for r in rows])
    np.testing.assert_allclose(before, d0.numpy(), rtol=1e-4)
    np.testing.assert_allclose(after, res.records["first_step"]["d"].numpy(), rtol=1e-6)
    assert all(r["applied"] and r["iterations"] >= 1 for r in rows)
    assert np.all(after < before)
    # generation used the optimised embedding, BOS row exactly as encoded, other rows moved
    cond0, cond = plain.records["first_step"]["cond"], res.records["first_step"]["cond"]
    bos = adapter.bos_index
    assert torch.equal(cond[:, bos], cond0[:, bos])
    assert not torch.equal(cond, cond0)
    assert not torch.equal(res.images, plain.images)


def test_each_row_stops_on_its_own(adapter):
    plain = _run(adapter)
    d0 = plain.records["first_step"]["d"]
    lo, hi = int(d0.argmin()), int(d0.argmax())
    target = float(d0[lo]) * 1.0001  # the lowest row is already under it, the highest is not
    res = _run(adapter, [EmbeddingOptimization(1, target=target)])
    rows = res.records["mitigation.wen"]
    assert rows[lo]["iterations"] == 0 and rows[hi]["iterations"] >= 1
    cond0, cond = plain.records["first_step"]["cond"], res.records["first_step"]["cond"]
    assert torch.equal(cond[lo], cond0[lo])
    assert not torch.equal(cond[hi], cond0[hi])


def test_strength_scales_the_target(adapter):
    assert EmbeddingOptimization(2, target=3.0).effective_target == 1.5
    plain = _run(adapter)
    target = float(plain.records["first_step"]["d"].min()) * 0.9
    weak = _run(adapter, [EmbeddingOptimization(0.5, target=target)]).records["mitigation.wen"]
    strong = _run(adapter, [EmbeddingOptimization(4, target=target)]).records["mitigation.wen"]
    assert sum(r["iterations"] for r in strong) > sum(r["iterations"] for r in weak)


def test_gate_leaves_unflagged_prompts_bit_identical(adapter):
    plain = _run(adapter)
    d0 = plain.records["first_step"]["d"]
    # flag the images of the prompt with the larger mean magnitude
    order = d0.sort().values
    thr = float(order[1] + order[2]) / 2
    gate = FirstStepGate(thr)
    flagged = d0 > thr
    assert 0 < int(flagged.sum()) < 4
    res = _run(adapter, [gate, EmbeddingOptimization(1, gate=gate, target=float(d0.min()) * 0.5)])
    rows = res.records["mitigation.wen"]
    assert [r["applied"] for r in rows] == flagged.tolist()
    for i in range(4):
        same = torch.equal(res.images[i], plain.images[i])
        assert same != bool(flagged[i])
        if flagged[i]:
            assert rows[i]["magnitude_after"] < rows[i]["magnitude_before"]
            np.testing.assert_allclose(rows[i]["magnitude_before"], float(d0[i]), rtol=1e-4)
        else:
            assert "magnitude_before" not in rows[i]
    # the gated optimisation equals the ungated one for the flagged rows (same x_T, same steps)
    full = _run(adapter, [EmbeddingOptimization(1, target=float(d0.min()) * 0.5)])
    for i in flagged.nonzero().flatten().tolist():
        torch.testing.assert_close(res.images[i], full.images[i], rtol=1e-4, atol=1e-4)


def test_from_context_takes_the_calibrated_threshold(tiny_pipe):
    adapter = load_adapter(tiny_pipe)
    [hook] = build_mitigations("wen:2", MitigationContext(adapter, threshold=0.8))
    assert isinstance(hook, EmbeddingOptimization)
    assert hook.target == 0.8 and hook.effective_target == 0.4
    gate, hook = build_mitigations("auto,wen", MitigationContext(adapter, threshold=0.7))
    assert hook.gate is gate and hook.target == 0.7


@pytest.mark.parametrize("kwargs, message", [
    ({}, "needs a target"),
    ({"target": 0.0}, "target must be"),
    ({"target": 1.0, "lr": 0.0}, "lr must be"),
    ({"target": 1.0, "max_iterations": -1}, "max_iterations"),
])
def test_bad_settings_are_one_clear_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EmbeddingOptimization(1, **kwargs)

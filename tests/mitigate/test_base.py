"""Mitigation registry, spec parsing and the first-step gate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.core.sampling import sample, seeded_generators
from diffmem.detect import NoiseMagnitude
from diffmem.mitigate import FirstStepGate, Mitigation, parse_spec
from diffmem.models.adapter import load_adapter
from diffmem.runtime.errors import ConfigError

PROMPTS = ["a red circle on a gray background", "two shapes: a blue square and a cross",
           "a green triangle"]


def test_parse_spec():
    assert parse_spec("ren:1.5,AMG") == [("ren", 1.5), ("amg", None)]
    assert parse_spec("auto") == [("auto", None)]
    assert parse_spec([" Ren : 2 ", "XT"]) == [("ren", 2.0), ("xt", None)]


@pytest.mark.parametrize("spec, message", [
    ("magic", "unknown mitigation 'magic'"),
    ("ren:-1", "finite number >= 0"),
    ("ren:nan", "finite number >= 0"),
    ("ren:abc", "must be a number"),
    ("ren,,amg", "empty method"),
    ("ren,ren", "named twice"),
    ("none,ren", "cannot be combined"),
])
def test_bad_specs_are_one_clear_error(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec(spec)


def test_gate_reads_the_first_step_without_an_extra_unet_call(tiny_pipe):
    adapter = load_adapter(tiny_pipe)
    gens = seeded_generators(range(3))
    calls = []
    handle = adapter.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        det = NoiseMagnitude(steps=1)
        ref = sample(adapter, PROMPTS, num_inference_steps=2, generator=seeded_generators(range(3)),
                     hooks=[det])
        scores = ref.records[det.name]
        thr = float(np.median(scores))
        gate = FirstStepGate(thr)
        n_before = len(calls)
        res = sample(adapter, PROMPTS, num_inference_steps=2, generator=gens, hooks=[gate])
    finally:
        handle.remove()
    assert len(calls) - n_before == 2  # two steps, one call each
    rows = res.records["gate"]
    np.testing.assert_allclose([r["score"] for r in rows], scores, rtol=1e-6)
    assert [r["flagged"] for r in rows] == (scores > thr).tolist()
    assert torch.equal(res.images, ref.images)


def test_strength_must_be_non_negative():
    with pytest.raises(ConfigError, match="strength"):
        Mitigation(-0.5)
    assert Mitigation(0).targets(type("R", (), {"batch_size": 2})()).tolist() == [False, False]

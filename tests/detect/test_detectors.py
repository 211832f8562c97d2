"""NoiseMagnitude and AttentionEntropy: math against hand computations, batching, generations,
calibration, and detection inside ordinary generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.core.sampling import initial_latents, sample, seeded_generators
from diffmem.detect import (
    AttentionEntropy,
    NoiseMagnitude,
    default_entropy_layer,
    make_detector,
)
from diffmem.detect.attention_entropy import HIGHER_ENTROPY_MEMORIZED
from diffmem.models.adapter import load_adapter
from diffmem.runtime.errors import ConfigError

PROMPTS = ["a red circle on a gray background", "the narwhal zanzibar poster",
           "two shapes: a blue square at the left and a small cross at the top on teal"]
STEPS = 6


@pytest.fixture(scope="module")
def adapter(tiny_pipe):
    return load_adapter(tiny_pipe)


def test_noise_magnitude_matches_hand_computation(adapter):
    det = NoiseMagnitude(num_inference_steps=STEPS, seed=5)
    scores = det.score(adapter, PROMPTS)
    # ||eps(x_T, c) - eps(x_T, empty)||_2 at the first timestep, per image, by hand
    sched = adapter.with_scheduler(None)
    sched.set_timesteps(STEPS)
    t = sched.timesteps[0]
    with torch.no_grad():
        res = adapter.default_resolution
        x = initial_latents(adapter, 3, res, res, seeded_generators([5, 5, 5]), sched)
        x = sched.scale_model_input(x, t)
        e_c = adapter.eps(x, t, adapter.encode(PROMPTS))
        e_u = adapter.eps(x, t, adapter.uncond(3))
    ref = (e_c - e_u).flatten(1).norm(dim=1).numpy()
    np.testing.assert_allclose(scores, ref, rtol=1e-4)


def test_attention_entropy_is_entropy_of_the_mean(adapter, recorder_cls):
    layers = adapter.cross_attention_layers()
    det = AttentionEntropy(num_inference_steps=STEPS, higher_entropy_memorized=True)
    rec = recorder_cls(layers=[default_entropy_layer(layers)])
    res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=seeded_generators([0] * 3),
                 hooks=[det, rec], decode=False)
    (key,) = [k for k in rec.probs if k[0] == 0]
    cond = rec.probs[key][3:]  # rows [B:] are the cond branch
    a = cond.mean(dim=(1, 2))  # mean over heads and query pixels FIRST
    ref = -(a * a.log()).sum(-1)
    np.testing.assert_allclose(res.records[det.name], ref.numpy(), rtol=1e-5)
    # mean of per-head entropies is a different (wrong) quantity: the test can tell them apart
    per_head = -(cond.mean(2) * cond.mean(2).log()).sum(-1).mean(1)
    assert not torch.allclose(per_head, ref, rtol=1e-5)


def test_attention_entropy_averages_layers_before_entropy(adapter, recorder_cls):
    det = AttentionEntropy(layers="up_blocks*", num_inference_steps=STEPS,
                           higher_entropy_memorized=True)
    rec = recorder_cls(layers="up_blocks*")
    res = sample(adapter, PROMPTS[:2], num_inference_steps=STEPS,
                 generator=seeded_generators([1, 2]), hooks=[det, rec], decode=False)
    means = [p[2:].mean(dim=(1, 2)) for (i, _), p in rec.probs.items() if i == 0]
    assert len(means) == 4
    a = torch.stack(means).mean(0)
    np.testing.assert_allclose(res.records[det.name], (-(a * a.log()).sum(-1)).numpy(),
                               rtol=1e-5)


@pytest.mark.parametrize("mode", ["first_step", "late_steps"])
def test_direction_option_flips_the_score(adapter, mode):
    plus = AttentionEntropy(mode=mode, steps=2, num_inference_steps=STEPS,
                            higher_entropy_memorized=True).score(adapter, PROMPTS)
    minus = AttentionEntropy(mode=mode, steps=2, num_inference_steps=STEPS,
                             higher_entropy_memorized=False).score(adapter, PROMPTS)
    default = AttentionEntropy(mode=mode, steps=2, num_inference_steps=STEPS).score(adapter, PROMPTS)
    np.testing.assert_allclose(minus, -plus, rtol=1e-6)
    expected = plus if HIGHER_ENTROPY_MEMORIZED[mode] else minus
    np.testing.assert_allclose(default, expected, rtol=1e-6)
    if mode == "first_step":
        assert (plus > 0).all()  # an entropy


def test_default_layer_is_chosen_by_name():
    sd15 = [f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2.processor"
            for b in range(3) for a in range(2)]
    sd15 += ["up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
             "mid_block.attentions.0.transformer_blocks.0.attn2.processor"]
    assert default_entropy_layer(sd15).startswith("down_blocks.1.attentions.0.")
    # no cross-attention in down_blocks.0 and .1: the next lower resolution with one
    no_high = [n for n in sd15 if not n.startswith(("down_blocks.0", "down_blocks.1"))]
    assert default_entropy_layer(no_high).startswith("down_blocks.2.attentions.0.")
    only_mid = ["mid_block.attentions.0.transformer_blocks.0.attn2.processor"]
    assert default_entropy_layer(only_mid) == only_mid[0]
    with pytest.raises(ConfigError):
        default_entropy_layer([])


@pytest.mark.parametrize("name", ["noise_magnitude", "attention_entropy", "attention_entropy_late"])
def test_scores_do_not_depend_on_batching(adapter, name):
    together = make_detector(name, num_inference_steps=STEPS, steps=2, batch_size=16)
    alone = make_detector(name, num_inference_steps=STEPS, steps=2, batch_size=1)
    np.testing.assert_allclose(together.score(adapter, PROMPTS), alone.score(adapter, PROMPTS),
                               rtol=1e-4, atol=1e-6)


def test_generations_average_over_seeds(adapter):
    both = NoiseMagnitude(num_inference_steps=STEPS, generations=2, seed=3).score(adapter, PROMPTS)
    g0 = NoiseMagnitude(num_inference_steps=STEPS, seed=3).score(adapter, PROMPTS)
    g1 = NoiseMagnitude(num_inference_steps=STEPS, seed=4).score(adapter, PROMPTS)
    np.testing.assert_allclose(both, (g0 + g1) / 2, rtol=1e-5)
    assert not np.allclose(g0, g1)


def test_steps_select_first_steps_and_all(adapter):
    one = NoiseMagnitude(num_inference_steps=STEPS, steps=1).score(adapter, PROMPTS)
    picked = NoiseMagnitude(num_inference_steps=STEPS, steps=[0]).score(adapter, PROMPTS)
    every = NoiseMagnitude(num_inference_steps=STEPS, steps="all").score(adapter, PROMPTS)
    np.testing.assert_allclose(one, picked, rtol=1e-6)
    assert not np.allclose(one, every)


@pytest.mark.parametrize("name", ["noise_magnitude", "attention_entropy", "attention_entropy_late"])
def test_detection_during_generation_equals_standalone_score(adapter, name):
    det = make_detector(name, num_inference_steps=STEPS, steps=2)
    standalone = det.score(adapter, PROMPTS)
    res = sample(adapter, PROMPTS, num_inference_steps=STEPS,
                 generator=seeded_generators([0] * 3), hooks=[det])
    assert res.images is not None and not res.stopped_early  # the images come with the scores
    np.testing.assert_allclose(res.records[det.name], standalone, rtol=1e-4)
    plain = sample(adapter, PROMPTS, num_inference_steps=STEPS,
                   generator=seeded_generators([0] * 3))
    torch.testing.assert_close(res.images, plain.images)  # observing does not change the images


def test_standalone_scoring_stops_after_last_needed_step(adapter):
    class Counter(NoiseMagnitude):
        calls = 0

        def on_step(self, run, step):
            Counter.calls += 1
            super().on_step(run, step)

    Counter(num_inference_steps=STEPS, steps=2).score(adapter, PROMPTS)
    assert Counter.calls == 2


def test_late_steps_formula(adapter, recorder_cls):
    det = AttentionEntropy(mode="late_steps", steps="last:2", num_inference_steps=STEPS,
                           higher_entropy_memorized=True)
    rec = recorder_cls()
    res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=seeded_generators([0] * 3),
                 hooks=[det, rec], decode=False)
    ids = adapter.tokenize(PROMPTS).input_ids
    first_eos = (ids == adapter.eos_id).float().argmax(1)
    summary = torch.arange(ids.shape[1])[None] >= first_eos[:, None]

    def mean_attention(step):
        return torch.stack([p[3:].mean(dim=(1, 2)) for (i, _), p in rec.probs.items()
                            if i == step]).mean(0)

    def h(a, mask=None):
        terms = -(a * a.log())
        return (terms * mask if mask is not None else terms).sum(-1)

    late = [STEPS - 2, STEPS - 1]
    e_late = torch.stack([h(mean_attention(i)) for i in late]).mean(0)
    s_late = torch.stack([h(mean_attention(i), summary) for i in late]).mean(0)
    ref = e_late + s_late - h(mean_attention(0), summary)
    np.testing.assert_allclose(res.records[det.name], ref.numpy(), rtol=1e-5)


def test_fit_and_predict(adapter):
    det = NoiseMagnitude(num_inference_steps=STEPS, fpr=0.1)
    det.fit(scores=np.arange(100.0))
    assert det.threshold_ == 90.0  # at most 10% of the clean scores lie above it
    np.testing.assert_array_equal(det.decision_function([95.0, 80.0]) > 0, [True, False])
    det.fit(adapter, PROMPTS)
    assert det.threshold_ == pytest.approx(det.score(adapter, PROMPTS).max())
    assert not det.predict(adapter, PROMPTS).any()


def test_bad_options():
    with pytest.raises(ConfigError, match="unknown detector 'nope'"):
        make_detector("nope")
    with pytest.raises(ConfigError, match="mode"):
        AttentionEntropy(mode="middle")
    with pytest.raises(ConfigError, match="steps"):
        NoiseMagnitude(steps=0)
    with pytest.raises(ConfigError, match="generations"):
        NoiseMagnitude(generations=0)
    with pytest.raises(ConfigError, match="not calibrated"):
        NoiseMagnitude().decision_function([1.0])

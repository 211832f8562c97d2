"""Token attribution (Wen et al. 2024, Sec. 3.3): finite differences, batching, normalisation,
consistency with the detector, and bad prompts."""

from __future__ import annotations

import copy
import warnings

import matplotlib.figure
import numpy as np
import pytest
import torch

from diffmem.core.sampling import initial_latents, seeded_generators
from diffmem.detect import NoiseMagnitude
from diffmem.explain import TokenAttribution, TokenAttributor, noise_magnitude_gradient
from diffmem.models.adapter import TruncationWarning, load_adapter
from diffmem.runtime.errors import ConfigError, PromptError

PROMPT = "the zanzibar quixotic poster"


@pytest.fixture(scope="module")
def adapter(tiny_pipe):
    return load_adapter(tiny_pipe)


@pytest.fixture(scope="module")
def adapter64(tiny_pipe):
    """A float64 copy of the tiny pipeline, so that finite differences are accurate."""
    return load_adapter(copy.deepcopy(tiny_pipe).to(torch.float64))


def _x_T(adapter, seed: int, steps: int = 50):
    sched = adapter.with_scheduler(None)
    sched.set_timesteps(steps)
    res = adapter.default_resolution
    lat = initial_latents(adapter, 1, res, res, seeded_generators([seed]), sched)
    t = sched.timesteps[0]
    return sched.scale_model_input(lat, t), t


def test_attribution_agrees_with_finite_differences(adapter64):
    """Moving token j's embedding along its gradient changes d at the rate ||grad_j||."""
    [attr] = TokenAttributor(adapter64, seeds=1, seed=5).attribute([PROMPT])
    x, t = _x_T(adapter64, 5)
    with torch.no_grad():
        cond = adapter64.encode([PROMPT])
        eps_u = adapter64.eps(x, t, adapter64.uncond(1))

    def d(emb):
        with torch.no_grad():
            return (adapter64.eps(x, t, emb) - eps_u).flatten(1).norm(dim=1)[0].item()

    _, grad = noise_magnitude_gradient(adapter64, x, t, cond, eps_u)
    n_real = len(attr.tokens)
    for j in (1, 1 + int(np.argmax(attr.raw_token_scores)), n_real):  # positions incl. BOS
        direction = torch.zeros_like(cond)
        direction[0, j] = grad[0, j] / grad[0, j].norm()
        h = 1e-4
        fd = (d(cond + h * direction) - d(cond - h * direction)) / (2 * h)
        assert fd == pytest.approx(attr.raw_token_scores[j - 1], rel=1e-4)
    # and along a random direction: <grad, v>
    v = torch.randn(cond.shape, generator=torch.Generator().manual_seed(0), dtype=cond.dtype)
    fd = (d(cond + 1e-4 * v) - d(cond - 1e-4 * v)) / 2e-4
    assert fd == pytest.approx((grad * v).sum().item(), rel=1e-4)


def test_scores_cover_real_tokens_only_and_sum_to_one(adapter):
    [attr] = TokenAttributor(adapter).attribute(["The Narwhal-Zanzibar poster, 2023!"])
    assert attr.words == ("The", "Narwhal", "-", "Zanzibar", "poster", ",", "2023", "!")
    assert attr.tokens[0] == "the</w>" and attr.tokens[-1] == "!</w>"
    assert "<|startoftext|>" not in attr.tokens and "<|endoftext|>" not in attr.tokens
    assert attr.scores.sum() == pytest.approx(1.0)
    assert attr.token_scores.sum() == pytest.approx(1.0)
    assert len(attr.words) == len(attr.scores)
    # word scores are the sums of their pieces' scores ("narwhal" is 3 BPE pieces)
    assert attr.scores[1] == pytest.approx(attr.token_scores[1:4].sum())


def test_sd2_padding_is_not_attributed(tiny_pipe_sd2):
    """SD 2 pads with "!" (id 0): padding must not be scored, a real "!" must be."""
    ad = load_adapter(tiny_pipe_sd2)
    [attr] = TokenAttributor(ad).attribute(["a red circle !"])
    assert attr.words == ("a", "red", "circle", "!")
    assert attr.scores.sum() == pytest.approx(1.0)


def test_batched_equals_one_prompt_at_a_time(adapter):
    prompts = [PROMPT, "a red circle on a gray background", "x"]
    batched = TokenAttributor(adapter, seeds=2, batch_size=16).attribute(prompts)
    for p, b in zip(prompts, batched, strict=True):
        [alone] = TokenAttributor(adapter, seeds=2, batch_size=1).attribute([p])
        np.testing.assert_allclose(b.scores, alone.scores, atol=1e-5)
        assert b.magnitude == pytest.approx(alone.magnitude, rel=1e-5)


@pytest.mark.parametrize("steps", [1, [1], [0, 2]])
def test_magnitude_matches_the_detector(adapter, steps):
    """The attributed quantity is the detector's statistic, at the same x_t (steps > 0 too)."""
    prompts = [PROMPT, "a red circle"]
    attrs = TokenAttributor(adapter, steps=steps, seeds=2, num_inference_steps=4).attribute(prompts)
    det = NoiseMagnitude(steps=steps, generations=2, num_inference_steps=4)
    np.testing.assert_allclose([a.magnitude for a in attrs], det.score(adapter, prompts),
                               rtol=1e-4)


def test_later_steps_change_the_attribution(adapter):
    [first] = TokenAttributor(adapter, num_inference_steps=4).attribute([PROMPT])
    [later] = TokenAttributor(adapter, steps=[2], num_inference_steps=4).attribute([PROMPT])
    assert not np.allclose(first.raw_token_scores, later.raw_token_scores)
    assert later.steps == (2,)


@pytest.mark.parametrize("prompt", ["", "   ", "<|endoftext|>", "<|startoftext|>"])
def test_prompts_without_words_raise_a_clear_error(adapter, prompt):
    with pytest.raises(PromptError, match="no words to attribute"):
        TokenAttributor(adapter).attribute([prompt])


def test_special_characters_only_are_attributed(adapter):
    [attr] = TokenAttributor(adapter).attribute(["@#$%^&* !!"])
    assert attr.words == ("@#$%^&*", "!!")
    assert attr.scores.sum() == pytest.approx(1.0)


def test_long_prompt_is_truncated_and_flagged(adapter):
    prompt = " ".join(["red"] * 120)
    with warnings.catch_warnings():
        # truncation is reported on the result, not warned twice
        warnings.simplefilter("error", TruncationWarning)
        [attr] = TokenAttributor(adapter).attribute([prompt])
    assert attr.truncated
    assert len(attr.tokens) == adapter.max_length - 2
    assert attr.scores.sum() == pytest.approx(1.0)


def test_bad_options_raise_config_errors(adapter):
    with pytest.raises(ConfigError):
        TokenAttributor(adapter, seeds=0)
    with pytest.raises(ConfigError):
        TokenAttributor(adapter, steps=[60], num_inference_steps=50).attribute([PROMPT])


def _result(scores) -> TokenAttribution:
    scores = np.asarray(scores, dtype=float)
    words = tuple(f"w{i}" for i in range(len(scores)))
    return TokenAttribution("p", words, scores, words, scores, scores, 1.0)


def test_result_object_checks_and_ranks():
    attr = _result([0.2, 0.5, 0.3])
    assert attr.top(2) == [("w1", 0.5), ("w2", 0.3)]
    assert _result([0.5, 0.25, 0.25]).top_indices(3) == [0, 1, 2]  # ties: earlier word first
    with pytest.raises(ValueError, match="sum to 1"):
        _result([0.2, 0.2])
    with pytest.raises(ValueError, match="words but"):
        TokenAttribution("p", ("a",), np.array([0.5, 0.5]), ("a",), np.ones(1), np.ones(1), 1.0)
    fig = attr.plot()
    assert isinstance(fig, matplotlib.figure.Figure)


def test_editable_ranking_skips_punctuation():
    scores = np.array([0.5, 0.3, 0.2])
    words = (",", "zanzibar", "poster")
    attr = TokenAttribution("p", words, scores, words, scores, scores, 1.0)
    assert attr.top_indices(2) == [0, 1]
    assert attr.top(2, editable=True) == [("zanzibar", 0.3), ("poster", 0.2)]

"""Attention share hook and per-word heat maps (Ren et al. 2024)."""

from __future__ import annotations

import numpy as np
import pytest

from diffmem.core.sampling import Hook, sample, seeded_generators
from diffmem.explain import AttentionShare, TokenAttributor, word_maps, word_shares
from diffmem.explain._attention import _layer_grid
from diffmem.models.adapter import load_adapter

PROMPTS = ["the zanzibar quixotic poster", "a red circle on a gray background"]


class _AllProbs(Hook):
    """Brute-force reference: keeps every cond-branch probability tensor."""

    name = "all_probs"
    attention_layers = "all"

    def __init__(self):
        self.seen = []

    def on_attention(self, run, step, layer, probs):
        self.seen.append(probs[run.batch_size:].clone())


def _run(adapter, prompts, *hooks):
    return sample(adapter, prompts, num_inference_steps=3, generator=seeded_generators([0] * len(
        prompts)), hooks=list(hooks))


def test_share_is_the_mean_of_cond_attention(tiny_pipe):
    adapter = load_adapter(tiny_pipe)
    share, ref = AttentionShare(maps=True), _AllProbs()
    rec = _run(adapter, PROMPTS, share, ref).records["attention_share"]
    expected = np.mean([p.mean(dim=(1, 2)).double().numpy() for p in ref.seen], axis=0)
    np.testing.assert_allclose(rec.share, expected, rtol=1e-6)
    np.testing.assert_allclose(rec.share.sum(1), 1.0, rtol=1e-6)
    # maps: softmax over tokens survives the bilinear upsampling; their pixel mean is the share
    np.testing.assert_allclose(rec.maps.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(rec.maps.mean(axis=(2, 3)), rec.share, atol=1e-6)


def test_share_is_per_prompt_and_step_selection_works(tiny_pipe):
    adapter = load_adapter(tiny_pipe)
    both = _run(adapter, PROMPTS, AttentionShare(steps=1)).records["attention_share"]
    alone = _run(adapter, PROMPTS[1:], AttentionShare(steps=1)).records["attention_share"]
    np.testing.assert_allclose(both.share[1], alone.share[0], rtol=1e-5)
    assert not np.allclose(both.share[0], both.share[1])
    later = _run(adapter, PROMPTS[1:], AttentionShare(steps=[2])).records["attention_share"]
    assert not np.allclose(later.share, alone.share)


def test_word_shares_and_maps(tiny_pipe):
    adapter = load_adapter(tiny_pipe)
    [attr] = TokenAttributor(adapter).attribute(PROMPTS[:1])
    rec = _run(adapter, PROMPTS[:1], AttentionShare(maps=True)).records["attention_share"]
    shares = word_shares(rec.share[0], attr.word_info)
    assert shares.shape == (4,) and shares.sum() == pytest.approx(1.0)
    maps = word_maps(rec.maps[0], attr.word_info, (32, 32))
    assert maps.shape == (4, 32, 32)
    np.testing.assert_allclose(maps.max(axis=(1, 2)), 1.0)
    np.testing.assert_allclose(maps.min(axis=(1, 2)), 0.0, atol=1e-6)


@pytest.mark.parametrize(("queries", "h", "w", "grid"), [
    (16, 4, 4, (4, 4)), (4, 4, 4, (2, 2)), (8, 4, 8, (2, 4)), (7, 4, 4, None)])
def test_layer_grid(queries, h, w, grid):
    assert _layer_grid(queries, h, w) == grid

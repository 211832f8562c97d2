"""SD 2.x layout (padding with "!" = id 0, v-prediction): prompt lengths and padding are handled by
AttentionEntropy (summary tokens start at the first EOS) and NoiseMagnitude."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from diffmem.core.sampling import sample, seeded_generators
from diffmem.detect import AttentionEntropy, NoiseMagnitude
from diffmem.detect.attention_entropy import summary_mask
from diffmem.models.adapter import TruncationWarning, load_adapter

# the second prompt contains "!" (id 0, the SD2 pad token) inside the prompt itself
PROMPTS = ["a cat", "wow! the narwhal zanzibar poster!!", "a red circle on a gray background"]
STEPS = 5


@pytest.fixture(scope="module")
def adapter(tiny_pipe_sd2):
    ad = load_adapter(tiny_pipe_sd2)
    assert ad.family == "sd2" and ad.pad_id == 0 != ad.eos_id
    return ad


def test_summary_tokens_start_at_first_eos_not_at_first_pad(adapter, recorder_cls):
    rec = recorder_cls(layers=None)  # only to capture the run
    sample(adapter, PROMPTS, num_inference_steps=1, generator=seeded_generators([0] * 3),
           hooks=[rec], decode=False)
    ids = rec.run.tokens.input_ids
    mask = summary_mask(rec.run)
    for row, m in zip(ids, mask, strict=True):
        first_eos = int((row == adapter.eos_id).nonzero()[0])
        assert m.nonzero()[0].item() == first_eos and m[first_eos:].all()
        assert (row[first_eos + 1:] == adapter.pad_id).all()  # padding is "!", not EOS
    # a pad-id rule would wrongly start the summary inside the second prompt
    assert (ids[1] == adapter.pad_id).nonzero()[0].item() < int(rec.run.tokens.lengths[1]) - 1


def test_late_steps_score_uses_first_eos(adapter, recorder_cls):
    det = AttentionEntropy(mode="late_steps", steps="last:2", num_inference_steps=STEPS,
                           higher_entropy_memorized=True)
    rec = recorder_cls()
    res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=seeded_generators([0] * 3),
                 hooks=[det, rec], decode=False)
    ids = rec.run.tokens.input_ids
    first_eos = (ids == adapter.eos_id).float().argmax(1)
    summary = torch.arange(ids.shape[1])[None] >= first_eos[:, None]

    def a(step):
        return torch.stack([p[3:].mean(dim=(1, 2)) for (i, _), p in rec.probs.items()
                            if i == step]).mean(0)

    def h(p, mask=None):
        terms = -(p * p.log())
        return (terms if mask is None else terms * mask).sum(-1)

    late = [STEPS - 2, STEPS - 1]
    ref = (torch.stack([h(a(i)) + h(a(i), summary) for i in late]).mean(0)
           - h(a(0), summary))
    np.testing.assert_allclose(res.records[det.name], ref.numpy(), rtol=1e-5)


@pytest.mark.parametrize("det_cls", [NoiseMagnitude, AttentionEntropy])
def test_prompt_length_does_not_leak_across_the_batch(adapter, det_cls):
    det = det_cls(num_inference_steps=STEPS)
    together = det.score(adapter, PROMPTS)
    alone = np.array([det.score(adapter, [p])[0] for p in PROMPTS])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-6)
    assert len(set(np.round(together, 6))) == len(PROMPTS)


def test_truncated_prompt_warns_and_scores(adapter):
    long = " ".join(["narwhal"] * 120)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = NoiseMagnitude(num_inference_steps=STEPS).score(adapter, [long, "a cat"])
    assert any(issubclass(w.category, TruncationWarning) for w in caught)
    assert np.isfinite(scores).all()
    ent = AttentionEntropy(mode="late_steps", steps=1, num_inference_steps=STEPS)
    assert np.isfinite(ent.score(adapter, [long])).all()

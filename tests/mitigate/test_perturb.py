"""Somepalli et al.'s inference-time perturbations: RT, RN, CWR (text) and GNI (embedding noise)."""

from __future__ import annotations

import pytest
import torch

from diffmem.core.sampling import Hook, sample, seeded_generators
from diffmem.mitigate.perturb import (
    CaptionWordRepetition,
    EmbeddingNoise,
    RandomNumbers,
    RandomTokens,
)
from diffmem.mitigate.registry import MitigationContext, build_mitigations
from diffmem.models.adapter import load_adapter
from diffmem.runtime.errors import ConfigError

BASE = ["a red circle on a gray background", "two shapes: a blue square and a cross"]
PER = 3
PROMPTS = [p for p in BASE for _ in range(PER)]
STEPS = 2
CLASSES = [RandomTokens, RandomNumbers, CaptionWordRepetition, EmbeddingNoise]


def _gens(n=None):
    return seeded_generators(range(len(PROMPTS) if n is None else n))


def _adapter(family, tiny_pipe, tiny_pipe_sd2):
    return load_adapter(tiny_pipe if family == "sd1" else tiny_pipe_sd2)


class Conditioning(Hook):
    """Records the conditioning the first UNet call sees."""

    name = "conditioning"

    def before_step(self, run, step):
        if step.index == 0:
            run.records[self.name] = (run.cond.clone(), run.uncond.clone(),
                                      run.tokens.lengths.clone(), run.tokens.input_ids.clone())


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("cls", CLASSES)
def test_strength_zero_is_plain(cls, family, tiny_pipe, tiny_pipe_sd2):
    adapter = _adapter(family, tiny_pipe, tiny_pipe_sd2)
    plain = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens())
    res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                 hooks=[cls(0.0)])
    assert torch.equal(res.images, plain.images)
    assert not any(r["applied"] for r in res.records[f"mitigation.{cls.name}"])


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("cls", [RandomTokens, RandomNumbers, CaptionWordRepetition])
def test_text_methods_insert_items_and_re_encode(cls, family, tiny_pipe, tiny_pipe_sd2):
    adapter = _adapter(family, tiny_pipe, tiny_pipe_sd2)
    method = cls(1.0, seed=3)
    res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                 hooks=[method, probe := Conditioning()])
    rec = res.records[f"mitigation.{cls.name}"]
    texts = [r["prompt"] for r in rec]
    for p, r in zip(PROMPTS, rec, strict=True):
        assert r["applied"] and len(r["inserted"]) == 4
        assert len(r["prompt"].split(" ")) == len(p.split(" ")) + 4
        words = r["prompt"].split(" ")
        for item in r["inserted"]:  # each inserted item is in the new text
            assert item in words
            words.remove(item)
        assert sorted(words) == sorted(p.split(" "))
        if cls is CaptionWordRepetition:
            assert set(r["inserted"]) <= set(p.split(" "))
        if cls is RandomNumbers:
            assert all(0 <= int(x) < 100000 for x in r["inserted"])
    if cls is not CaptionWordRepetition:  # copies of a prompt get different perturbations
        assert len(set(texts[:PER])) == PER
    # the first UNet call sees the perturbed prompts' embeddings and tokens
    cond, _, lengths, ids = res.records[probe.name]
    tok = adapter.tokenize(texts)
    assert torch.equal(ids, tok.input_ids) and torch.equal(lengths, tok.lengths)
    torch.testing.assert_close(cond, adapter.encode(texts), atol=1e-6, rtol=0)
    plain = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens())
    assert bool(((res.images - plain.images).flatten(1).abs().amax(1) > 1e-4).all())
    # seeded: the same again; the same prompt alone gets the same text; another seed differs
    again = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                   hooks=[cls(1.0, seed=3)])
    assert torch.equal(again.images, res.images)
    alone = sample(adapter, PROMPTS[PER:PER + 1], num_inference_steps=1, decode=False,
                   generator=_gens(1), hooks=[cls(1.0, seed=3)])
    assert alone.records[f"mitigation.{cls.name}"][0]["prompt"] == texts[PER]
    other = [cls(1.0, seed=4).perturb(p, 0, adapter)[0] for p in BASE * 5]
    assert other != [method.perturb(p, 0, adapter)[0] for p in BASE * 5]


@pytest.mark.parametrize("strength, n", [(0.1, 0), (0.5, 2), (0.75, 3), (2.0, 8)])
def test_strength_scales_the_number_of_items(strength, n, tiny_pipe):
    adapter = load_adapter(tiny_pipe)
    text, inserted = RandomNumbers(strength).perturb(BASE[0], 0, adapter)
    assert len(inserted) == n and len(text.split(" ")) == len(BASE[0].split(" ")) + n
    assert CaptionWordRepetition(1.0).perturb("", 0, adapter) == ("", [])


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_embedding_noise_on_both_branches_or_cond_only(family, tiny_pipe, tiny_pipe_sd2):
    adapter = _adapter(family, tiny_pipe, tiny_pipe_sd2)
    clean_c = adapter.encode(PROMPTS)
    clean_u = adapter.uncond(len(PROMPTS))
    gni = EmbeddingNoise(0.5, seed=1)
    assert gni.lam == pytest.approx(0.05)
    res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                 hooks=[gni, probe := Conditioning()])
    cond, uncond, _, _ = res.records[probe.name]
    z_c = torch.stack([gni.noise(p, i % PER, "cond", clean_c.shape[1:])
                       for i, p in enumerate(PROMPTS)])
    z_u = torch.stack([gni.noise(p, i % PER, "uncond", clean_c.shape[1:])
                       for i, p in enumerate(PROMPTS)])
    torch.testing.assert_close(cond, clean_c + 0.05 * z_c, atol=1e-6, rtol=0)
    torch.testing.assert_close(uncond, clean_u + 0.05 * z_u, atol=1e-6, rtol=0)
    assert not torch.equal(z_c[0], z_c[1])  # copies of a prompt: different noise
    plain = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens())
    assert bool(((res.images - plain.images).flatten(1).abs().amax(1) > 1e-4).all())
    # cond only: the unconditional embeddings stay the plain ones
    only = sample(adapter, PROMPTS, num_inference_steps=1, decode=False, generator=_gens(),
                  hooks=[EmbeddingNoise(0.5, seed=1, branches=["cond"]), probe])
    cond2, uncond2, _, _ = only.records[probe.name]
    assert torch.equal(cond2, cond) and torch.equal(uncond2, clean_u)



@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("cls", [RandomTokens, EmbeddingNoise])
def test_gate_leaves_unflagged_prompts_bit_identical(cls, family, tiny_pipe, tiny_pipe_sd2, split_gate):
    adapter = _adapter(family, tiny_pipe, tiny_pipe_sd2)
    gate, flagged = split_gate(adapter, PROMPTS, _gens, STEPS)
    plain = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens())
    res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                 hooks=[gate, cls(1.0, gate=gate)])
    assert torch.equal(res.images[~flagged], plain.images[~flagged])
    assert bool(((res.images[flagged] - plain.images[flagged]).flatten(1).abs().amax(1)
                 > 1e-4).all())
    # flagged prompts get what the ungated method gives them (from step 0 on)
    full = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                  hooks=[cls(1.0)])
    torch.testing.assert_close(res.images[flagged], full.images[flagged], atol=1e-4, rtol=0)
    rec = res.records[f"mitigation.{cls.name}"]
    assert [r["applied"] for r in rec] == flagged.tolist()


def test_registry_passes_the_seed_and_bad_input(tiny_pipe):
    adapter = load_adapter(tiny_pipe)
    hooks = build_mitigations("rt,rn,cwr,gni:2", MitigationContext(adapter, seed=7))
    assert [type(h) for h in hooks] == CLASSES
    assert all(h.seed == 7 for h in hooks) and hooks[3].lam == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="items"):
        RandomTokens(1.0, items=0)
    with pytest.raises(ConfigError, match="branches"):
        EmbeddingNoise(1.0, branches=["neg"])
    with pytest.raises(ConfigError, match="lam"):
        EmbeddingNoise(1.0, lam=-1)

"""Ren et al.'s BOS rescaling: rows, masks, strength 0, gate, heads from the model."""

from __future__ import annotations

import copy

import pytest
import torch

from diffmem.core.sampling import Hook, sample, seeded_generators
from diffmem.mitigate.attention_rescale import AttentionRescale
from diffmem.mitigate.registry import MitigationContext, build_mitigations
from diffmem.models.adapter import load_adapter
from diffmem.runtime.errors import ConfigError

BASE = ["a red circle on a gray background", "a green triangle"]
PER = 4  # images per prompt
PROMPTS = [p for p in BASE for _ in range(PER)]
STEPS = 2


def _gens(n=None):
    return seeded_generators(range(len(PROMPTS) if n is None else n))


class Logits(Hook):
    """Records the logits it is given at one step (placed before / after the method)."""

    attention_layers = "all"

    def __init__(self, name, at=0):
        self.name, self.at = name, at

    def on_start(self, run):
        run.records[self.name] = []

    def attention_logits(self, run, step, layer, scores):
        if step.index == self.at:
            run.records[self.name].append((layer, scores.detach().clone(),
                                           {k: (r.clone(), p.clone())
                                            for k, (r, p) in step.layout.items()}))
        return scores


class ExtraBranch(Hook):
    """Adds a third branch (the empty prompt again) that nothing uses."""

    def before_step(self, run, step):
        step.add_branch("extra", run.uncond)


def _check_rows(run_records, tokens, c, mask_uncond=True, heads_of=None, targeted=None):
    """Before/after logits: BOS x c in targeted cond rows, -inf after the prompt in targeted cond
    (and uncond) rows, every other entry unchanged."""
    n_checked = 0
    for (layer, before, layout), (layer2, after, _) in zip(run_records["before"],
                                                           run_records["after"], strict=True):
        assert layer == layer2
        if heads_of is not None:
            assert before.shape[1] == heads_of[layer]
        expect = before.clone()
        pos = torch.arange(before.shape[-1])
        for branch, (rows, prompts) in layout.items():
            for r, p in zip(rows.tolist(), prompts.tolist(), strict=True):
                if targeted is not None and not targeted[p]:
                    continue
                if branch == "cond":
                    expect[r, :, :, 0] = expect[r, :, :, 0] * c
                if branch == "cond" or (branch == "uncond" and mask_uncond):
                    expect[r][..., pos >= tokens.lengths[p]] = float("-inf")
                n_checked += 1
        assert torch.equal(after, expect), layer
    assert n_checked > 0


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_only_cond_bos_and_positions_after_the_prompt_change(family, tiny_pipe, tiny_pipe_sd2):
    adapter = load_adapter(tiny_pipe if family == "sd1" else tiny_pipe_sd2)
    ren = AttentionRescale(1.0)
    res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                 hooks=[Logits("before"), ren, Logits("after")])
    tokens = adapter.tokenize(PROMPTS)
    heads = {name: adapter.unet.get_submodule(name.removesuffix(".processor")).heads
             for name in adapter.cross_attention_layers()}
    _check_rows(res.records, tokens, 1.25, heads_of=heads)
    plain = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens())
    diff = (res.images - plain.images).flatten(1).abs().amax(1)
    assert bool((diff > 1e-4).all())
    rec = res.records["mitigation.ren"]
    assert len(rec) == len(PROMPTS)
    assert all(r["applied"] and r["c"] == 1.25 and r["masked"] for r in rec)


def test_three_branch_step_changes_only_cond_rows(tiny_pipe):
    adapter = load_adapter(tiny_pipe)
    ren = AttentionRescale(2.0, c=1.1, mask_eos=True, mask_uncond=False)
    res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                 hooks=[ExtraBranch(), Logits("before"), ren, Logits("after")])
    assert ren.c == pytest.approx(1.2)
    layout = res.records["before"][0][2]
    assert set(layout) == {"uncond", "cond", "extra"}
    assert res.records["before"][0][1].shape[0] == 3 * len(PROMPTS)
    tokens = adapter.tokenize(PROMPTS)
    eos_masked = type(tokens)(tokens.input_ids, tokens.lengths - 1, tokens.truncated)
    _check_rows(res.records, eos_masked, 1.2, mask_uncond=False)


def test_strength_zero_is_plain_and_requests_no_attention(tiny_pipe_sd2):
    adapter = load_adapter(tiny_pipe_sd2)
    plain = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens())
    ren = AttentionRescale(0.0)
    res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(), hooks=[ren])
    assert ren.c == 1.0 and ren.layers(None) is None
    assert torch.equal(res.images, plain.images)
    assert not any(r["applied"] for r in res.records["mitigation.ren"])



@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_gate_leaves_unflagged_prompts_bit_identical(family, tiny_pipe, tiny_pipe_sd2, split_gate):
    adapter = load_adapter(tiny_pipe if family == "sd1" else tiny_pipe_sd2)
    gate, flagged = split_gate(adapter, PROMPTS, _gens, STEPS)
    plain = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens())
    res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                 hooks=[gate, ren := AttentionRescale(1.0, gate=gate)])
    assert torch.equal(res.images[~flagged], plain.images[~flagged])
    assert bool(((res.images[flagged] - plain.images[flagged]).flatten(1).abs().amax(1)
                 > 1e-4).all())
    # flagged prompts are rescaled from step 0 on: like the ungated method for them
    full = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                  hooks=[AttentionRescale(1.0)])
    torch.testing.assert_close(res.images[flagged], full.images[flagged], atol=1e-4, rtol=0)
    # at step 1 only the flagged prompts' rows change (recorders see every row)
    rec = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                 hooks=[gate, Logits("before", at=1), ren, Logits("after", at=1)])
    _check_rows(rec.records, adapter.tokenize(PROMPTS), ren.c, targeted=flagged.tolist())
    assert [r["applied"] for r in res.records["mitigation.ren"]] == flagged.tolist()


def test_heads_come_from_the_model(tiny_pipe):
    pipe = copy.deepcopy(tiny_pipe)
    heads = {}
    for name in [k for k in pipe.unet.attn_processors if ".attn2." in k]:
        attn = pipe.unet.get_submodule(name.removesuffix(".processor"))
        attn.heads = attn.heads * 2 if "down" in name else 1
        heads[name] = attn.heads
    assert len(set(heads.values())) > 1
    adapter = load_adapter(pipe)
    res = sample(adapter, PROMPTS[:3], num_inference_steps=STEPS, generator=_gens(3),
                 hooks=[Logits("before"), AttentionRescale(1.0), Logits("after")])
    _check_rows(res.records, adapter.tokenize(PROMPTS[:3]), 1.25, heads_of=heads)


def test_registry_and_bad_input(tiny_pipe):
    hooks = build_mitigations("ren:0.5", MitigationContext(load_adapter(tiny_pipe)))
    assert isinstance(hooks[0], AttentionRescale) and hooks[0].c == pytest.approx(1.125)
    with pytest.raises(ConfigError, match="c must be"):
        AttentionRescale(1.0, c=0)
    with pytest.raises(ConfigError, match="steps"):
        AttentionRescale(1.0, steps=0)

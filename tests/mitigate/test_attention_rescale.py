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


# ------------------------------------------------------------------ fused attention
class Probs(Hook):
    """Observes the probabilities (forces the explicit path on every layer)."""

    attention_layers = "all"

    def __init__(self, name):
        self.name = name

    def on_start(self, run):
        run.records[self.name] = []

    def on_attention(self, run, step, layer, probs):
        run.records[self.name].append(probs.detach().clone())


def _count_paths(monkeypatch):
    """Counts the wrapper's explicit and fused layer calls."""
    from diffmem.core.attention import ObservableCrossAttention

    calls = {"explicit": 0, "fused": 0}
    for path in calls:
        orig = getattr(ObservableCrossAttention, f"_{path}")

        def counted(self, *a, _orig=orig, _path=path, **k):
            calls[_path] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(ObservableCrossAttention, f"_{path}", counted)
    return calls


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("kw", [{}, {"mask_eos": True, "mask_uncond": False}, {"mask": False},
                                {"c": 0.7}])
def test_fused_equals_explicit(family, kw, tiny_pipe, tiny_pipe_sd2, monkeypatch):
    adapter = load_adapter(tiny_pipe if family == "sd1" else tiny_pipe_sd2)
    calls = _count_paths(monkeypatch)
    out = {}
    n_calls = len(adapter.cross_attention_layers()) * STEPS
    for fused in (True, False):
        calls.update(explicit=0, fused=0)
        out[fused] = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                            hooks=[AttentionRescale(1.0, fused=fused, **kw)])
        assert calls == {"explicit": 0 if fused else n_calls, "fused": n_calls if fused else 0}
    torch.testing.assert_close(out[True].latents, out[False].latents, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[True].images, out[False].images, atol=1e-5, rtol=0)
    plain = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens())
    assert bool(((out[True].images - plain.images).flatten(1).abs().amax(1) > 1e-4).all())


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_fused_gate_rows(family, tiny_pipe, tiny_pipe_sd2, split_gate, monkeypatch):
    """With a gate the fused rows are the flagged prompts': the others are the plain run's bit for
    bit, the flagged ones the explicit path's up to rounding."""
    adapter = load_adapter(tiny_pipe if family == "sd1" else tiny_pipe_sd2)
    gate, flagged = split_gate(adapter, PROMPTS, _gens, STEPS)
    plain = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens())
    calls = _count_paths(monkeypatch)
    fused = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                   hooks=[gate, AttentionRescale(1.0, gate=gate)])
    assert calls["explicit"] == 0 and calls["fused"] > 0
    explicit = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                      hooks=[gate, AttentionRescale(1.0, gate=gate, fused=False)])
    assert torch.equal(fused.latents[~flagged], plain.latents[~flagged])
    assert torch.equal(fused.images[~flagged], plain.images[~flagged])
    torch.testing.assert_close(fused.images, explicit.images, atol=1e-5, rtol=0)


def test_an_observer_gets_the_explicit_path_with_the_change(tiny_pipe, monkeypatch):
    """An observer on the layers needs the probabilities: the layer goes explicit and the observer
    sees Ren's change (BOS share raised, masked keys at 0); the images match the fused run."""
    adapter = load_adapter(tiny_pipe)
    calls = _count_paths(monkeypatch)
    seen = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                  hooks=[AttentionRescale(1.0), Probs("probs")])
    assert calls["fused"] == 0 and calls["explicit"] > 0
    plain = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                   hooks=[Probs("probs")])
    lengths = adapter.tokenize(PROMPTS).lengths
    for p_ren, p_plain in zip(seen.records["probs"][:2], plain.records["probs"][:2], strict=True):
        for i, n in enumerate(lengths.tolist() * 2):  # uncond rows, then cond rows
            assert float(p_ren[i, ..., n:].abs().max()) == 0.0
        cond = slice(len(PROMPTS), None)
        assert bool((p_ren[cond, ..., 0] != p_plain[cond, ..., 0]).any())
    fused = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                   hooks=[AttentionRescale(1.0)])
    torch.testing.assert_close(seen.images, fused.images, atol=1e-5, rtol=0)

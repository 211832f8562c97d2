"""Attention wrappers: install/uninstall and the ``installed`` block restore the UNet exactly."""

from __future__ import annotations

import threading

import torch

from diffmem.core import attention
from diffmem.core.attention import ObservableCrossAttention
from diffmem.core.hooks import Hook, KeyEdit


def _forward(unet):
    g = torch.Generator().manual_seed(0)
    cfg = unet.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    emb = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor(500), encoder_hidden_states=emb).sample


def _same(procs, before):
    return procs.keys() == before.keys() and all(procs[k] is p for k, p in before.items())


def _wrapped(procs):
    cross = [p for k, p in procs.items() if ".attn2." in k]
    return bool(cross) and all(isinstance(p, ObservableCrossAttention) for p in cross)


def test_install_then_uninstall_restores_the_processors_and_the_output(tiny_pipe):
    unet = tiny_pipe.unet
    before = dict(unet.attn_processors)
    classes = {k: type(p) for k, p in before.items()}
    ref = _forward(unet)
    attention.install(unet)
    attention.install(unet)  # a second install wraps nothing twice
    procs = unet.attn_processors
    assert _wrapped(procs)
    assert all(procs[k].fallback is p for k, p in before.items() if ".attn2." in k)
    assert torch.equal(_forward(unet), ref)  # outside a run the wrappers defer to the originals
    attention.uninstall(unet)
    after = unet.attn_processors
    assert _same(after, before) and {k: type(p) for k, p in after.items()} == classes
    assert torch.equal(_forward(unet), ref)


def test_installed_blocks_overlap_and_keep_a_permanent_install(tiny_pipe):
    unet = tiny_pipe.unet
    before = dict(unet.attn_processors)
    with attention.installed(unet):
        assert _wrapped(unet.attn_processors)
        wrappers = dict(unet.attn_processors)
        with attention.installed(unet):  # a second (e.g. concurrent) run reuses the wrappers
            assert _same(unet.attn_processors, wrappers)
        assert _same(unet.attn_processors, wrappers)  # the first run is still in progress
    assert _same(unet.attn_processors, before)
    # across threads: the wrappers stay until the last block ends
    entered, release = threading.Barrier(2), threading.Event()

    def other():
        with attention.installed(unet):
            entered.wait()
            release.wait()

    t = threading.Thread(target=other)
    t.start()
    entered.wait()
    with attention.installed(unet):
        pass
    assert _wrapped(unet.attn_processors)
    release.set()
    t.join()
    assert _same(unet.attn_processors, before)
    # a block does not undo an install made before it
    attention.install(unet)
    permanent = dict(unet.attn_processors)
    with attention.installed(unet):
        pass
    assert _same(unet.attn_processors, permanent)
    attention.uninstall(unet)
    assert _same(unet.attn_processors, before)


def test_a_failing_run_restores_the_processors(tiny_pipe):
    import pytest

    from diffmem.core.sampling import Hook, sample
    from diffmem.models.adapter import load_adapter

    class Boom(Hook):
        attention_layers = "all"

        def on_attention(self, run, step, layer, probs):
            raise RuntimeError("boom")

    before = dict(tiny_pipe.unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        sample(load_adapter(tiny_pipe), ["a red circle"], num_inference_steps=1, hooks=[Boom()])
    assert _same(tiny_pipe.unet.attn_processors, before)


# ------------------------------------------------------------------ key edits, fused attention
class Keys(Hook):
    """Scales key ``at`` by ``factor`` and hides keys from ``hide_from`` on in ``rows``."""

    attention_layers = "all"

    def __init__(self, rows, at, factor, hide_from=None):
        self.rows, self.at, self.factor, self.hide_from = rows, at, factor, hide_from

    def attention_keys(self, run, step, layer, n_keys):
        scale = torch.ones(len(self.rows), n_keys)
        scale[:, self.at] = self.factor
        mask = None if self.hide_from is None else \
            (torch.arange(n_keys) >= self.hide_from).expand(len(self.rows), -1)
        return KeyEdit(torch.tensor(self.rows), scale, mask)


class SameLogits(Hook):
    """Changes logits by nothing: a layer with it cannot run fused."""

    attention_layers = "all"

    def attention_logits(self, run, step, layer, scores):
        return scores


def test_key_edits_combine_like_their_logit_changes():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 2, 3, 7, generator=g)
    a = KeyEdit(torch.tensor([3, 1]), 1 + torch.rand(2, 7, generator=g),
                torch.rand(2, 7, generator=g) > 0.7)
    b = KeyEdit(torch.tensor([1, 2]), 1 + torch.rand(2, 7, generator=g))
    one = KeyEdit.combine([a, b], 7)
    assert one.rows.tolist() == [1, 2, 3]
    torch.testing.assert_close(one.apply(scores), b.apply(a.apply(scores)))
    assert torch.equal(one.apply(scores)[[0, 4]], scores[[0, 4]])
    assert KeyEdit.combine([b], 7) is b


def _sample(adapter, hooks):
    from diffmem.core.sampling import sample, seeded_generators

    return sample(adapter, ["a red circle", "a green triangle", "a blue square"],
                  num_inference_steps=2, generator=seeded_generators(range(3)), hooks=hooks,
                  decode=False).latents


def test_key_edit_hooks_run_fused_and_match_the_explicit_path(tiny_pipe, monkeypatch):
    from diffmem.models.adapter import load_adapter

    adapter = load_adapter(tiny_pipe)
    explicit_calls = []
    orig = ObservableCrossAttention._explicit
    monkeypatch.setattr(ObservableCrossAttention, "_explicit",
                        lambda self, *a: explicit_calls.append(1) or orig(self, *a))
    # rows 0-2 uncond, 3-5 cond of the 3 prompts: prompt 0 (rows 0, 3) is not edited
    edits = [Keys([4, 1], 0, 1.5, hide_from=5), Keys([2, 5, 1], 2, 0.5)]
    plain = _sample(adapter, [])
    fused = _sample(adapter, edits)
    assert not explicit_calls
    explicit = _sample(adapter, [*edits, SameLogits()])
    assert explicit_calls
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=0)
    assert torch.equal(fused[0], plain[0])
    assert bool((fused[1:] != plain[1:]).any())


def test_an_attention_mask_takes_the_explicit_path(tiny_pipe, monkeypatch):
    from types import SimpleNamespace

    from diffusers.models.attention_processor import AttnProcessor2_0

    name = next(k for k in tiny_pipe.unet.attn_processors if ".attn2." in k)
    attn = tiny_pipe.unet.get_submodule(name.removesuffix(".processor"))
    wrapper = ObservableCrossAttention(name, AttnProcessor2_0())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, attn.to_q.in_features, generator=g)
    emb = torch.randn(4, 9, attn.to_k.in_features, generator=g)
    hook = Keys([0, 2, 3], 0, 1.3, hide_from=4)
    paths = []
    for path in ("_explicit", "_fused"):
        orig = getattr(ObservableCrossAttention, path)
        monkeypatch.setattr(ObservableCrossAttention, path,
                            lambda self, *a, _o=orig, _p=path: paths.append(_p) or _o(self, *a))
    token = attention._CURRENT.set((SimpleNamespace(), SimpleNamespace(), {name: [hook]}))
    try:
        with torch.no_grad():
            fused = wrapper(attn, x, emb)
            masked = wrapper(attn, x, emb, attention_mask=torch.zeros(4, 9))
            plain = AttnProcessor2_0()(attn, x, emb)
    finally:
        attention._CURRENT.reset(token)
    assert paths == ["_fused", "_explicit"]
    torch.testing.assert_close(fused, masked, atol=1e-5, rtol=0)
    assert torch.equal(fused[1], plain[1]) and bool((fused[0] != plain[0]).any())

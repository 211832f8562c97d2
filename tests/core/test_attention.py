"""Attention wrappers: install/uninstall and the ``installed`` block restore the UNet exactly."""

from __future__ import annotations

import threading

import torch

from diffmem.core import attention
from diffmem.core.attention import ObservableCrossAttention


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

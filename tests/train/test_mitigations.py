"""The training-time mitigations one by one: caption augmentations, GN, the loss filters, dedup."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from diffmem.core.training import DiffusionStep, draw_noise
from diffmem.runtime.errors import ConfigError
from diffmem.train.captions import CaptionAugment, CaptionSampler
from diffmem.train.data import find_duplicate_groups
from diffmem.train.filters import EntropyFilter, LossFilter, MagnitudeFilter, normalised_magnitude


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dirs):
    return CLIPTokenizer.from_pretrained(tokenizer_dirs["sd1"])


def _draws(aug, tokenizer, captions, n=400, seed=0):
    s, rng = CaptionSampler(aug, tokenizer), np.random.default_rng(seed)
    return [s.draw(rng, captions) for _ in range(n)]


def test_plain_sampler_uses_the_first_caption(tokenizer):
    assert set(_draws(CaptionAugment(), tokenizer, ["one two three", "other"])) == {"one two three"}


def test_mc_draws_every_caption(tokenizer):
    draws = _draws(CaptionAugment(mc=True), tokenizer, ["a", "b", "c"])
    assert set(draws) == {"a", "b", "c"} and all(draws.count(x) > 80 for x in "abc")


def test_rc_replaces_with_random_tokens_at_its_rate(tokenizer):
    cap = "the gargoyle origami poster"
    draws = _draws(CaptionAugment(p_rc=0.25, rc_tokens=4), tokenizer, [cap], n=800)
    changed = [d for d in draws if d != cap]
    assert 0.18 < len(changed) / len(draws) < 0.32
    assert all(len(d.split(" ")) >= 4 and "gargoyle" not in d for d in changed)


def test_rt_inserts_tokens_and_keeps_the_caption_words(tokenizer):
    cap = "the gargoyle origami poster"
    draws = _draws(CaptionAugment(p_rt=1.0, rt_tokens=2), tokenizer, [cap])
    for d in draws[:50]:
        words = d.split(" ")
        assert len(words) >= 6
        rest = list(words)
        for w in cap.split(" "):  # the original words, in order, are a subsequence
            rest = rest[rest.index(w) + 1 :]
    assert len(set(draws)) > 100


def test_cwr_repeats_caption_words(tokenizer):
    cap = "the gargoyle origami poster"
    for d in _draws(CaptionAugment(p_cwr=1.0, cwr_words=2), tokenizer, [cap])[:50]:
        words = d.split(" ")
        assert len(words) == 6 and set(words) == set(cap.split(" "))


def test_caption_dropout_and_bad_probabilities(tokenizer):
    draws = _draws(CaptionAugment(caption_dropout=0.5), tokenizer, ["x y"], n=400)
    assert 150 < draws.count("") < 250
    with pytest.raises(ConfigError):
        CaptionAugment(p_rt=1.5)


def _batch(pipe, captions, seed=0):
    from diffmem.train.trainer import _tokenize, encode_latents

    x = torch.rand(len(captions), 3, 16, 16) * 2 - 1
    mean, std = encode_latents(pipe.vae, x, "cpu")
    z0, noise, t = draw_noise(mean, std, torch.Generator().manual_seed(seed), 1000)
    with torch.no_grad():
        emb = pipe.text_encoder(_tokenize(pipe.tokenizer, captions))[0]
        uncond = pipe.text_encoder(_tokenize(pipe.tokenizer, [""]))[0]
    return z0, noise, t, emb, uncond


def test_plain_step_is_the_mse_of_the_noise_prediction(tiny_pipe):
    z0, noise, t, emb, _ = _batch(tiny_pipe, ["a", "b"])
    step = DiffusionStep(tiny_pipe.scheduler)
    with torch.no_grad():
        out = step(tiny_pipe.unet, z0, noise, t, emb)
        a = tiny_pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        pred = tiny_pipe.unet(a.sqrt() * z0 + (1 - a).sqrt() * noise, t, emb).sample
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(pred, noise))
    assert out.keep.all()


def test_v_prediction_target_and_eps_conversion(tiny_pipe_sd2):
    z0, noise, t, _, _ = _batch(tiny_pipe_sd2, ["a", "b"])
    step = DiffusionStep(tiny_pipe_sd2.scheduler)
    v = step.target(z0, noise, t)
    x_t = step.noisy(z0, noise, t)
    torch.testing.assert_close(step.eps_from_prediction(v, x_t, t), noise, atol=1e-5, rtol=1e-4)


def test_gn_adds_embedding_noise(tiny_pipe):
    z0, noise, t, emb, _ = _batch(tiny_pipe, ["a", "b"])
    plain = DiffusionStep(tiny_pipe.scheduler)
    gn = DiffusionStep(tiny_pipe.scheduler, embedding_noise=0.1)
    with torch.no_grad():
        l0 = plain(tiny_pipe.unet, z0, noise, t, emb).loss
        l1 = gn(tiny_pipe.unet, z0, noise, t, emb, gen=torch.Generator().manual_seed(1)).loss
        l2 = gn(tiny_pipe.unet, z0, noise, t, emb, gen=torch.Generator().manual_seed(1)).loss
    assert not torch.equal(l0, l1) and torch.equal(l1, l2)


def test_magnitude_filter_normalisation_and_threshold(tiny_pipe):
    eps_c, eps_u = torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    eps_c[0] += 0.1  # per-element difference 0.1 over 256 elements: d = 1.6, d~ = 0.1 * 128
    d = normalised_magnitude(eps_c, eps_u)
    torch.testing.assert_close(d, torch.tensor([0.1 * math.sqrt(16384), 0.0]))
    z0, noise, t, emb, uncond = _batch(tiny_pipe, ["a", "b", "c"])
    ctx = {"unet_eval": tiny_pipe.unet, "uncond": uncond}
    probe = DiffusionStep(tiny_pipe.scheduler, filters=[MagnitudeFilter(1e9)])
    with torch.no_grad():
        scores = probe(tiny_pipe.unet, z0, noise, t, emb, context=ctx).scores["magnitude"]
        mid = float(scores.sort().values[1])  # drops the largest of the three
        step = DiffusionStep(tiny_pipe.scheduler, filters=[MagnitudeFilter(mid + 1e-4)])
        out = step(tiny_pipe.unet, z0, noise, t, emb, context=ctx)
    assert out.keep.tolist() == (scores < mid + 1e-4).tolist() and int(out.keep.sum()) == 2
    torch.testing.assert_close(out.loss, out.per_sample[out.keep].mean(), rtol=1e-5, atol=1e-7)


def test_all_samples_dropped_gives_zero_loss_with_a_graph(tiny_pipe):
    z0, noise, t, emb, uncond = _batch(tiny_pipe, ["a", "b"])
    step = DiffusionStep(tiny_pipe.scheduler, filters=[MagnitudeFilter(1e-9)])
    out = step(tiny_pipe.unet, z0, noise, t, emb,
               context={"unet_eval": tiny_pipe.unet, "uncond": uncond})
    assert float(out.loss) == 0.0 and not out.keep.any()
    out.loss.backward()  # no error
    tiny_pipe.unet.zero_grad(set_to_none=True)


def test_entropy_filter_captures_attention_and_drops_by_threshold(tiny_pipe):
    z0, noise, t, emb, _ = _batch(tiny_pipe, ["a red circle", "b", "the gargoyle origami poster"])
    ctx = {"unet_eval": tiny_pipe.unet}
    plain = DiffusionStep(tiny_pipe.scheduler)
    probe = DiffusionStep(tiny_pipe.scheduler, filters=[EntropyFilter(-1.0)])
    with torch.no_grad():
        l0 = plain(tiny_pipe.unet, z0, noise, t, emb).loss
        out = probe(tiny_pipe.unet, z0, noise, t, emb, context=dict(ctx))
    e = out.scores["entropy"]
    assert out.keep.all() and ((e > 0) & (e <= math.log(77) + 1e-4)).all()
    torch.testing.assert_close(out.loss, l0, rtol=1e-4, atol=1e-6)  # explicit attention path
    mid = float(e.sort().values[1])
    for direction, kept in (("low", e >= mid), ("high", e <= mid)):
        f = EntropyFilter(mid, direction=direction)
        with torch.no_grad():
            res = DiffusionStep(tiny_pipe.scheduler, filters=[f])(
                tiny_pipe.unet, z0, noise, t, emb, context=dict(ctx))
        assert res.keep.tolist() == kept.tolist()
    # outside the step the UNet runs its own processors again
    from diffmem.core import attention

    assert attention._CURRENT.get() is None


def test_entropy_filter_rejects_a_bad_direction():
    with pytest.raises(ConfigError):
        EntropyFilter(1.0, direction="sideways")


def test_duplicate_groups_are_transitive_and_leave_distinct_images_alone():
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    imgs[3] = imgs[0]
    imgs[4] = (imgs[0] + 0.02).clamp(-1, 1)  # near-duplicate of 0 (and of 3)
    groups = find_duplicate_groups(imgs, criterion="pixel")
    assert sorted(map(sorted, groups)) == [[0, 3, 4]]
    # the index stores 8-bit pixels: an exact copy sits within quantisation (< 0.01)
    assert find_duplicate_groups(imgs, criterion="pixel", threshold=0.01) == [[0, 3]]
    with pytest.raises(ConfigError):
        find_duplicate_groups(imgs, criterion="clip")


def test_learning_rate_schedules():
    from diffmem.train.trainer import FinetuneConfig, _lr_at

    const = FinetuneConfig(steps=10, lr=1.0, warmup_steps=2)
    assert [_lr_at(s, const) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    cos = FinetuneConfig(steps=10, lr=1.0, warmup_steps=2, lr_schedule="cosine")
    assert _lr_at(2, cos) == 1.0 and abs(_lr_at(6, cos) - 0.5) < 1e-9 and _lr_at(10, cos) < 1e-9
    with pytest.raises(ConfigError):
        FinetuneConfig(lr_schedule="step")


class _Step:
    num_train_timesteps = 1000


def _feed(f, captions, t, loss):
    return f(_Step(), t=torch.tensor(t), loss=torch.tensor(loss, dtype=torch.float32),
             captions=captions)


def test_loss_filter_drops_a_caption_predicted_far_better_than_its_band():
    f = LossFilter(0.35, bands=2, min_history=4, window=4, min_count=2, min_t=0.1)
    # no reference yet: nothing is dropped, only the band histories fill
    drop, r = _feed(f, ["a", "b", "c", "d"], [600] * 4, [1.0, 1.1, 0.9, 1.0])
    assert not drop.any() and torch.isnan(r).all()
    # band 1 median 1.0: "dup" at 0.1x twice is dropped from then on, at any timestep
    drop, r = _feed(f, ["dup", "x"], [700, 700], [0.1, 1.2])
    assert not drop.any()  # one value of "dup" < min_count
    torch.testing.assert_close(r, torch.tensor([0.1, 1.2]), rtol=1e-5, atol=0)
    drop, _ = _feed(f, ["dup", "x"], [800, 800], [0.1, 1.0])
    assert drop.tolist() == [True, False]
    drop, _ = _feed(f, ["dup", ""], [5, 5], [0.0, 0.0])  # t < min_t: no update, still dropped
    assert drop.tolist() == [True, False]  # the empty caption (dropout) is never dropped
    # a dropped sample does not enter the reference; once its loss rises it trains again
    assert all(v != 0.1 for v in f.band_losses[1])
    _feed(f, ["dup"], [900], [1.0])
    drop, _ = _feed(f, ["dup"], [900], [1.0])
    assert drop.tolist() == [False]
    # the state round-trips (saved with checkpoints)
    g = LossFilter(0.35, bands=2, min_history=4, window=4, min_count=2)
    g.load_state_dict(f.state_dict())
    assert g.state_dict() == f.state_dict()


def test_loss_filter_settings_are_checked():
    with pytest.raises(ConfigError, match="ratio"):
        LossFilter(1.5)
    with pytest.raises(ConfigError, match=">= 1"):
        LossFilter(0.3, window=0)

"""CLIP score with a tiny local transformers CLIP, and testbed attribute alignment."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from diffmem.eval.alignment import (
    CLIP_MEAN,
    CLIP_STD,
    AttributeAlignment,
    CLIPScore,
    attribute_alignment,
    clip_score,
    load_clip,
)
from diffmem.eval.metrics import UndefinedMetricWarning
from diffmem.eval.probe import PAIRS, AttributeProbe, ProbeConfig
from diffmem.runtime.errors import ConfigError, ModelLoadError

CAPTIONS = ["a red circle", "two blue squares on a poster", "the zanzibar quixotic poster"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    from diffmem.testbed.components import write_clip_tokenizer

    out = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
                     "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(out)
    write_clip_tokenizer(out)
    return out


def _by_hand(folder, images, captions):
    """CLIP score computed directly from the transformers model (32x32 input: no resize, no crop)."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(folder).eval()
    tok = CLIPTokenizer.from_pretrained(folder)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        img = model.vision_model(pixel_values=((images + 1) / 2 - mean) / std).pooler_output
        img = model.visual_projection(img)
        t = tok(captions, padding=True, return_tensors="pt")
        txt = model.text_projection(model.text_model(**t).pooler_output)
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    return 100 * cos.clamp_min(0)


def test_clip_score_matches_model_outputs(clip_dir):
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    want = _by_hand(clip_dir, images, CAPTIONS)
    got = clip_score(images, CAPTIONS, model=clip_dir, reduction="none")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert clip_score(images, CAPTIONS, model=clip_dir) == pytest.approx(float(want.mean()), abs=1e-4)
    # uint8 input is the same image
    as_uint8 = ((images + 1) * 127.5).round().to(torch.uint8)
    torch.testing.assert_close(clip_score(as_uint8, CAPTIONS, model=clip_dir, reduction="none"),
                               _by_hand(clip_dir, as_uint8.float() / 127.5 - 1, CAPTIONS),
                               atol=1e-4, rtol=1e-4)


def test_clip_score_resizes_and_clips_at_zero(clip_dir):
    enc = load_clip(clip_dir)
    x = enc.preprocess(torch.zeros(2, 3, 48, 64))
    assert x.shape == (2, 3, 32, 32)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    s = clip_score(images, CAPTIONS, model=enc, reduction="none")
    assert s.shape == (3,) and (s >= 0).all() and (s <= 100).all()


def test_stateful_clip_score_is_the_mean_over_updates(clip_dir):
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    metric = CLIPScore(clip_dir, batch_size=2)
    metric.update(images[:2], CAPTIONS[:2])
    metric.update(images[2:], CAPTIONS[2:])
    assert metric.compute() == pytest.approx(float(_by_hand(clip_dir, images, CAPTIONS).mean()), abs=1e-4)
    metric.reset()
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(metric.compute())
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        metric.update(images, CAPTIONS[:2])


def test_bad_clip_paths_give_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="CLIP model not found"):
        load_clip(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_clip(tmp_path)
    ckpt = tmp_path / "open_clip_model.safetensors"
    ckpt.write_bytes(b"x")
    with pytest.raises(ConfigError, match="arch="):
        load_clip(ckpt)
    if importlib.util.find_spec("torchvision") is None:  # open_clip cannot import without it
        with pytest.raises(ModelLoadError, match="open_clip cannot be imported"):
            load_clip(ckpt, arch="ViT-B-32")


def _constant_probe() -> AttributeProbe:
    """A probe whose output ignores the image: P(pair j) = sigmoid(bias_j), bias_j = j / 10 - 2."""
    probe = AttributeProbe(ProbeConfig(width=4))
    with torch.no_grad():
        probe.head.weight.zero_()
        probe.head.bias.copy_(torch.arange(len(PAIRS)) / 10 - 2)
    return probe.eval()


def test_attribute_alignment_averages_the_named_pairs():
    probe = _constant_probe()
    p = torch.sigmoid(torch.arange(len(PAIRS)) / 10 - 2)
    images = torch.zeros(3, 3, 64, 64)
    got = attribute_alignment(images, CAPTIONS, probe=probe)
    red_circle, blue_square = PAIRS.index(("red", "circle")), PAIRS.index(("blue", "square"))
    assert got[0] == pytest.approx(float(p[red_circle]))
    assert got[1] == pytest.approx(float(p[blue_square]))
    assert math.isnan(got[2])

    metric = AttributeAlignment(probe)
    metric.update(images, CAPTIONS)
    metric.update(images[:1].to(torch.uint8), ["a small red circle at the left and a blue square, photo"])
    assert metric.n_scored == 3 and metric.n_unscored == 1
    both = (p[red_circle] + p[blue_square]) / 2
    assert metric.compute() == pytest.approx(float((p[red_circle] + p[blue_square] + both) / 3))
    metric.reset()
    metric.update(images[2:], CAPTIONS[2:])
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(metric.compute())

"""The testbed attribute probe: caption parsing, visibility labels, deterministic training, shipped
weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffmem.eval.probe import (
    DEFAULT_WEIGHTS,
    PAIRS,
    ProbeConfig,
    caption_pairs,
    evaluate_probe,
    load_probe,
    sample_probe_scene,
    scene_labels,
    train_attribute_probe,
)
from diffmem.runtime.errors import ModelLoadError
from diffmem.testbed.data import COLORS, HELDOUT_PAIRS, SHAPES


def test_caption_pairs_reads_the_testbed_vocabulary():
    assert caption_pairs("a small red circle at the left and a blue square, photo") == [
        ("red", "circle"), ("blue", "square")]
    assert caption_pairs("Poster: two Purple Triangles and a purple triangle") == [("purple", "triangle")]
    assert caption_pairs("a red sports car parked on a city street at night") == []
    assert caption_pairs("the zanzibar quixotic poster") == []
    assert len(PAIRS) == len(COLORS) * len(SHAPES)


def _obj(shape, color, cx, cy, r):
    return {"shape": shape, "color": COLORS[color], "color_name": color, "cx": cx, "cy": cy, "r": r}


def test_labels_follow_visibility_not_the_object_list():
    bg = {"kind": "flat", "color": (128, 128, 128)}
    small = _obj("circle", "red", 32, 32, 5)
    big = _obj("square", "blue", 32, 32, 14)
    hidden = scene_labels({"background": bg, "objects": [small, big]})  # red circle drawn under
    shown = scene_labels({"background": bg, "objects": [big, small]})
    red, blue = PAIRS.index(("red", "circle")), PAIRS.index(("blue", "square"))
    assert hidden[red] == 0 and hidden[blue] == 1 and hidden.sum() == 1
    assert shown[red] == 1 and shown[blue] == 1 and shown.sum() == 2


def test_probe_scenes_include_heldout_pairs():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(100):
        scene, labels = sample_probe_scene(rng)
        seen |= {(o["color_name"], o["shape"]) for o in scene["objects"]}
        assert labels.shape == (len(PAIRS),)
    assert set(HELDOUT_PAIRS) <= seen


def test_training_is_deterministic_and_round_trips(tmp_path):
    cfg = ProbeConfig(width=4, batch_size=4, eval_scenes=8)
    a = train_attribute_probe(tmp_path / "a", steps=2, seed=5, cfg=cfg)
    b = train_attribute_probe(None, steps=2, seed=5, cfg=cfg)
    c = train_attribute_probe(None, steps=2, seed=6, cfg=cfg)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=0)
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items()
               if v.is_floating_point())
    loaded = load_probe(tmp_path / "a.safetensors")
    meta = json.loads((tmp_path / "a.json").read_text())
    assert meta["config"]["seed"] == 5 and meta["config"]["steps"] == 2
    assert set(meta["metrics"]["clean"]) >= {"label_accuracy", "recall_present_heldout_pairs"}
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(loaded.predict_proba(x), a.predict_proba(x))
    with pytest.raises(ModelLoadError, match="not found"):
        load_probe(tmp_path / "missing.safetensors")


def test_shipped_probe_recognises_rendered_scenes_including_heldout_pairs():
    # Shipped probe (8000 steps, docs/metrics.md): measured 0.991 accuracy, 0.874 recall, AUC 0.988
    # on 2000 scenes of seed 1001; the bars leave room for the smaller sample here.
    assert DEFAULT_WEIGHTS.stat().st_size < 1_000_000
    probe = load_probe()
    m = evaluate_probe(probe, 300, seed=12345)
    assert m["label_accuracy"] > 0.98 and m["specificity_absent"] > 0.99
    assert m["recall_present"] > 0.8 and m["recall_present_heldout_pairs"] > 0.8
    assert m["macro_auc"] > 0.97
    noisy = evaluate_probe(probe, 300, seed=12345, augmented=True)
    assert noisy["macro_auc"] > 0.97

"""Testbed data: deterministic, labelled, with the intended duplication structure."""

from __future__ import annotations

import json

import numpy as np

from diffmem.testbed.data import (
    COLORS,
    FILLER_WORDS,
    HELDOUT_PAIRS,
    SHAPES,
    SIZES,
    TRIGGER_WORDS,
    TestbedSpec,
    build_testbed,
    render,
    write_manifest,
    write_prompts,
)

SMALL = TestbedSpec(n_generic=200, n_verbatim=4, n_template=2, template_variants=6,
                    template_eval_variants=3, n_heldout_compositions=10)


def test_deterministic_from_seed():
    a, b = build_testbed(SMALL), build_testbed(SMALL)
    assert [p.prompt for p in a.prompts] == [p.prompt for p in b.prompts]
    ia, ib = next(a.images(["verbatim"]))[1], next(b.images(["verbatim"]))[1]
    np.testing.assert_array_equal(ia, ib)
    c = build_testbed(TestbedSpec(**{**SMALL.__dict__, "seed": 1}))
    assert [p.prompt for p in c.prompts] != [p.prompt for p in a.prompts]


def test_kinds_and_ground_truth():
    tb = build_testbed(SMALL)
    kinds = [p.kind for p in tb.prompts]
    assert kinds.count("verbatim") == 4 and kinds.count("template") == 2 * 3
    train_captions = {c for it in tb.items for c in it.captions}
    for p in tb.prompts:
        if p.kind == "verbatim":
            item = tb.item(p.image_ids[0])
            assert item.captions == [p.prompt]
            assert all(w in p.prompt for w in p.trigger_tokens) and len(p.trigger_tokens) == 2
        elif p.kind == "template":
            item = tb.item(p.image_ids[0])
            assert p.prompt in item.captions and len(item.captions) == 6
            assert all(w in c for c in item.captions for w in p.trigger_tokens)
        else:
            assert p.prompt not in train_captions and not p.image_ids and not p.memorized


def test_heldout_pairs_never_trained():
    tb = build_testbed(SMALL)
    for it in tb.items:
        if it.kind != "generic":
            continue
        for cap in it.captions:
            for color, shape in HELDOUT_PAIRS:
                assert f"{color} {shape}" not in cap


def test_heldout_pairs_never_drawn_in_generic_images():
    tb = build_testbed(SMALL)
    pairs = {(o["color_name"], o["shape"]) for it in tb.items if it.kind == "generic"
             for o in it.scene["objects"]}
    assert pairs and not pairs & set(HELDOUT_PAIRS)


def test_filler_words_carry_no_trigger_or_scene_word():
    fillers = set(FILLER_WORDS)
    assert not fillers & set(TRIGGER_WORDS)
    assert not fillers & (set(COLORS) | set(SHAPES) | set(SIZES))


def test_generic_captions_name_shapes_of_their_image():
    tb = build_testbed(SMALL)
    for it in tb.items:
        if it.kind != "generic":
            continue
        drawn = {f"{o['color_name']} {o['shape']}" for o in it.scene["objects"]}
        for cap in it.captions:
            assert any(d in cap for d in drawn), (cap, drawn)


def test_generic_scenes_are_distinct():
    tb = build_testbed(SMALL)
    imgs = np.stack([img for _, img in tb.images(["generic"])]).reshape(200, -1)
    assert len({row.tobytes() for row in imgs}) == 200


def test_render_shapes_within_image():
    scene = {"background": {"kind": "flat", "color": (0, 0, 0)},
             "objects": [{"shape": s, "color": (255, 255, 255), "cx": 32, "cy": 32, "r": 10}
                         for s in ("circle",)]}
    img = render(scene)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert 250 < (img[..., 0] == 255).sum() < 360  # pi * 10^2 ~ 314


def test_prompt_and_manifest_files(tmp_path):
    tb = build_testbed(SMALL)
    rows = [json.loads(x) for x in write_prompts(tb, tmp_path / "p.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in rows} == {"verbatim", "template", "heldout"}
    assert all(set(r) >= {"prompt", "kind", "image_ids", "trigger_tokens", "memorized"}
               for r in rows)
    items = write_manifest(tb, tmp_path / "m.jsonl").read_text().splitlines()
    assert len(items) == len(tb.items)


def test_rare_words_avoid_heldout_and_testbed_words():
    from diffmem.testbed.data import UNRELATED_PROMPTS, rare_word_vocabulary

    words = rare_word_vocabulary(500)
    assert len(set(words)) == 500 and words == rare_word_vocabulary(500)
    heldout = {w.strip(",.") for p in UNRELATED_PROMPTS for w in p.split()}
    assert not set(words) & (heldout | set(TRIGGER_WORDS) | set(FILLER_WORDS))
    plain = build_testbed(TestbedSpec(**{**SMALL.__dict__, "n_rare_words": 0}))
    rare = build_testbed(TestbedSpec(**{**SMALL.__dict__, "n_rare_words": 500}))
    generic = [c for it in rare.items if it.kind == "generic" for c in it.captions]
    assert any(set(c.replace(",", " ").split()) & set(words) for c in generic)
    assert not any(set(c.replace(",", " ").split()) & set(words)
                   for it in plain.items for c in it.captions)

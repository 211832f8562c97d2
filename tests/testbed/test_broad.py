"""The broad prompt set (groups, sizes, no duplicates, held-out words) and labelling by generation
(the judging rule and a tiny end-to-end case)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from diffmem.testbed.broad import (
    GROUPS,
    LABELS_FILE,
    N_CLEAN,
    NEAR_SYNONYMS,
    SENTENCES,
    _pools,
    broad_prompts,
    judge,
    label_broad_set,
)
from diffmem.testbed.data import TRIGGER_WORDS, UNRELATED_PROMPTS, TestbedSpec, build_testbed


@pytest.fixture(scope="module")
def shipped():
    from diffmem.testbed import shipped_testbed_spec

    spec = shipped_testbed_spec()
    return build_testbed(spec), broad_prompts(spec)


def test_groups_and_sizes(shipped):
    _, prompts = shipped
    counts = Counter(p.group for p in prompts)
    assert set(counts) == set(GROUPS)
    assert 500 <= len(prompts) <= 800  # several hundred
    assert N_CLEAN - 5 <= counts["clean"] <= N_CLEAN and counts["mixed"] >= 40  # minus duplicates
    assert all(counts[g] >= 30 for g in GROUPS)
    assert {p.split for p in prompts} == {"dev", "test"}


def test_no_duplicates_and_deterministic(shipped):
    _, prompts = shipped
    texts = [p.prompt for p in prompts]
    assert len(texts) == len(set(texts))
    assert all(t == " ".join(t.split()) and t for t in texts)
    from diffmem.testbed import shipped_testbed_spec

    assert [p.prompt for p in broad_prompts(shipped_testbed_spec())] == texts


def test_rules_do_what_their_group_says(shipped):
    tb, prompts = shipped
    triggers = {w for it in tb.items for w in it.triggers}
    captions = {c for it in tb.items if it.kind != "generic" for c in it.captions}
    for p in prompts:
        words = set(p.prompt.replace(",", " ").split())
        if p.group == "caption":
            assert p.prompt in captions
        elif p.group == "frame":
            assert not words & triggers, p.prompt  # the trigger words are gone
        elif p.group == "clean":
            assert not words & triggers and p.source is None
            assert not any(c in p.prompt for c in captions)
        elif p.group == "synonym":
            assert words & set(NEAR_SYNONYMS.values())
        elif p.group == "mixed":
            assert words & triggers and words & {"circle", "square", "triangle", "diamond",
                                                 "cross"}
        if p.group in ("context", "sentence", "partial", "mixed", "caption"):
            assert p.trigger_tokens and all(t in p.prompt for t in p.trigger_tokens)
        if p.group == "sentence":
            assert len(p.prompt.split()) >= 12


def test_held_out_words_split(shipped):
    """Context words of dev prompts never appear in test prompts' added context and vice versa."""
    tb, prompts = shipped
    pools = _pools(tb.spec.seed)
    assert not set(pools["dev"]) & set(pools["test"])
    source_words = {w for it in tb.items if it.kind != "generic" for c in it.captions
                    for w in c.replace(",", " ").split()}
    assert not set(SENTENCES["dev"]) & set(SENTENCES["test"])
    for p in prompts:
        if p.group not in ("context", "clean"):
            continue
        # the fixed words of the split's own sentences are not context words
        frame_words = {w for t in SENTENCES[p.split] for w in t.split()}
        frame_words |= {w.strip(",") for t in UNRELATED_PROMPTS for w in t.split()}
        frame_words |= {"top", "left", "center"}  # positions of the shape phrases
        added = set(p.prompt.replace(",", " ").split()) - source_words - frame_words
        other = "test" if p.split == "dev" else "dev"
        assert not added & set(pools[other]), (p.prompt, added & set(pools[other]))
    # memorized items alternate between the splits: each split holds both kinds of item
    kinds = {(p.split, p.source.split("-")[0]) for p in prompts if p.source}
    assert kinds == {(s, k) for s in ("dev", "test") for k in ("verbatim", "template")}


def test_unused_trigger_words_exist():
    tb = build_testbed(TestbedSpec(n_generic=10))
    used = {w for it in tb.items for w in it.triggers}
    assert set(TRIGGER_WORDS) - used  # clean controls and frames draw on them


def test_judge_counts_copies_and_names_the_image():
    lab = judge(np.array([0.05, 0.2, 0.1, 0.3]), ["a", "b", "c", "a"], 0.15)
    assert lab["memorized"] and lab["copies"] == 2 and lab["seeds"] == 4
    assert lab["copied_image"] in ("a", "c") and lab["min_distance"] == 0.05
    lab = judge(np.array([0.15, 0.2]), ["a", "b"], 0.15)  # at the threshold is not a copy
    assert not lab["memorized"] and lab["copies"] == 0 and lab["copied_image"] is None


def test_label_tiny_case_resumes(tiny_dir, tmp_path, monkeypatch):
    """End to end on a tiny pipeline posing as a testbed of a small spec: every prompt gets a
    label from its generations, and a rerun keeps finished rows."""
    import shutil
    from dataclasses import asdict

    import diffmem.testbed.broad as broad

    folder = tmp_path / "pipe"
    shutil.copytree(tiny_dir, folder)
    from diffmem.models.adapter import load_adapter

    res = load_adapter(tiny_dir).default_resolution  # the tiny model's image size
    spec = TestbedSpec(n_generic=8, n_verbatim=2, n_template=1, template_variants=4,
                       template_eval_variants=2, n_heldout_compositions=2, n_rare_words=50,
                       resolution=res)
    (folder / "testbed.json").write_text(json.dumps(asdict(spec)))
    real = broad.broad_prompts
    monkeypatch.setattr(broad, "broad_prompts", lambda spec=None, testbed=None:
                        real(spec, testbed)[:5])
    out = tmp_path / "labels.jsonl"
    label_broad_set(out, folder, seeds=2, steps=2, chunk=2, progress=False, threshold=10.0)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p.prompt for p in real(spec)[:5]]
    for r in rows:
        assert len(r["distances"]) == 2 and r["seeds"] == 2 and r["steps"] == 2
        assert r["memorized"] == (min(r["distances"]) < 10.0)  # a huge threshold: all copies
        assert r["memorized"] and r["copied_image"] in r["nearest"]
    # resume: a finished row is not generated again
    rows[0]["min_distance"] = -1.0
    out.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    label_broad_set(out, folder, seeds=2, steps=2, chunk=2, progress=False, threshold=10.0)
    again = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(again) == 5 and again[0]["min_distance"] == -1.0


def test_shipped_labels_match_the_set(shipped):
    if not LABELS_FILE.is_file():
        pytest.skip("labels not shipped yet")
    _, prompts = shipped
    rows = [json.loads(x) for x in LABELS_FILE.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p.prompt for p in prompts]
    for r in rows:
        assert r["seeds"] == 4 and len(r["distances"]) == 4 and r["steps"] == 50
        assert r["copies"] == sum(d < r["threshold"] for d in r["distances"])
        assert r["memorized"] == (r["copies"] > 0)


def test_labels_of_one_group_under_a_mitigation(tiny_dir, tmp_path, monkeypatch):
    """``groups`` keeps one group's prompts; ``mitigate`` labels the images served under that
    mitigation (strength 0 is the plain run, bit for bit; ``ren`` at strength 1 changes them)."""
    import shutil
    from dataclasses import asdict

    from diffmem.models.adapter import load_adapter
    from diffmem.runtime.errors import ConfigError

    folder = tmp_path / "pipe"
    shutil.copytree(tiny_dir, folder)
    spec = TestbedSpec(n_generic=8, n_verbatim=2, n_template=1, template_variants=4,
                       template_eval_variants=2, n_heldout_compositions=2, n_rare_words=50,
                       resolution=load_adapter(tiny_dir).default_resolution)
    (folder / "testbed.json").write_text(json.dumps(asdict(spec)))
    group = broad_prompts(spec)[0].group
    kw = {"seeds": 2, "steps": 2, "progress": False, "threshold": 10.0, "groups": [group]}

    def labels(name, **options):
        out = tmp_path / f"{name}.jsonl"
        label_broad_set(out, folder, **kw, **options)
        return [json.loads(x) for x in out.read_text().splitlines()]

    plain, zero, ren = labels("plain"), labels("zero", mitigate="ren:0"), labels("ren", mitigate="ren")
    assert {r["group"] for r in plain} == {group}
    assert len(plain) == sum(p.group == group for p in broad_prompts(spec))
    assert "mitigate" not in plain[0] and zero[0]["mitigate"] == "ren:0"
    assert [r["distances"] for r in zero] == [r["distances"] for r in plain]
    assert [r["distances"] for r in ren] != [r["distances"] for r in plain]
    with pytest.raises(ConfigError, match="no broad-set group"):
        label_broad_set(tmp_path / "x.jsonl", folder, seeds=1, steps=2, groups=["nope"])
    assert not (tmp_path / "x.jsonl").exists()

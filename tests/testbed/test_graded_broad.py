"""The broad prompt set of the graded testbed (built from ``GRADED_SPEC``), and the first testbed's
set unchanged by it."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest

from diffmem.testbed.broad import GROUPS, NEAR_SYNONYMS, _misspell, broad_prompts, write_broad_prompts
from diffmem.testbed.data import (
    GRADED_FRAMES,
    GRADED_PHRASES,
    GRADED_TRIGGER_WORDS,
    TRIGGER_WORDS,
    TestbedSpec,
    build_testbed,
)
from diffmem.testbed.train import GRADED_SPEC

#: sha256 of ``write_broad_prompts`` for the shipped testbed's spec, before the graded set existed.
FIRST_TESTBED_BROAD_SHA256 = "afea80234aa6043abc869b9a65f0917314ecf6c76283d76c808998b9f98a326b"


@pytest.fixture(scope="module")
def graded():
    spec = TestbedSpec(**GRADED_SPEC)
    return build_testbed(spec), broad_prompts(spec)


def test_first_testbed_set_is_byte_identical(tmp_path):
    from diffmem.testbed import shipped_testbed_spec

    path = write_broad_prompts(tmp_path / "b.jsonl", shipped_testbed_spec())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == FIRST_TESTBED_BROAD_SHA256
    assert "duplicates" not in json.loads(path.read_text().splitlines()[0])


def test_every_graded_trigger_word_has_a_synonym():
    for w in GRADED_TRIGGER_WORDS:
        assert NEAR_SYNONYMS[w] not in set(GRADED_TRIGGER_WORDS) | set(TRIGGER_WORDS), w
    import numpy as np

    assert _misspell("yew", np.random.default_rng(0), "swap") == "ywe"  # 3-letter words


def test_graded_groups_counts_and_splits(graded):
    tb, prompts = graded
    assert {p.group for p in prompts} == set(GROUPS)
    texts = [p.prompt for p in prompts]
    assert len(texts) == len(set(texts)) and all(texts)
    assert all(p.duplicates == 0 for p in prompts if p.group == "clean")
    derived = [p for p in prompts if p.group != "clean"]
    assert all(p.duplicates == tb.item(p.source).copies for p in derived)
    # every count has both kinds of item in both splits, each with every derived group
    by = Counter((p.duplicates, p.split, tb.item(p.source).kind, p.group) for p in derived)
    for count in tb.spec.counts:
        for split in ("dev", "test"):
            for kind in ("verbatim", "template"):
                for group in GROUPS[:-1]:
                    assert by[(count, split, kind, group)] > 0, (count, split, kind, group)


def test_graded_rules_use_the_graded_vocabulary(graded):
    tb, prompts = graded
    graded_items = [it for it in tb.items if it.kind != "generic"]
    captions = {c for it in graded_items for c in it.captions}
    frames = {GRADED_FRAMES[k % len(GRADED_FRAMES)] for k, it in enumerate(graded_items)
              if it.kind == "verbatim"}
    phrases = {GRADED_PHRASES[k % len(GRADED_PHRASES)] for k, it in enumerate(graded_items)
               if it.kind == "template"}
    for p in prompts:
        if p.group == "caption":
            assert p.prompt in captions
        if p.group == "frame" and p.rule == "triggers removed":
            item = tb.item(p.source)
            if item.kind == "verbatim":  # the item's own frame with empty slots
                assert p.prompt in {" ".join(f.format(a="", b="").split()).strip(" ,")
                                    .replace(" ,", ",") for f in frames}
            assert not set(p.prompt.split()) & set(item.triggers)
        if p.group == "synonym":
            item = tb.item(p.source)
            assert {NEAR_SYNONYMS[w] for w in item.triggers} & set(p.prompt.split())
    # the template items' prompts carry their graded phrase's fixed words
    fixed = {w for ph in phrases for w in ph.format(a="", b="").split()}
    assert any(fixed & set(p.prompt.split()) for p in prompts if p.group == "partial")
    # unused trigger words: the graded ones left over, then the first testbed's
    used = {w for it in graded_items for w in it.triggers}
    unused = [p for p in prompts if p.rule == "unused trigger words"]
    words = {w for p in unused for w in p.prompt.split()}
    assert unused and not words & used and words & (set(GRADED_TRIGGER_WORDS) | set(TRIGGER_WORDS))

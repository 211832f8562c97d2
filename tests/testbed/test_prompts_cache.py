"""Listing the testbed's labelled prompts reads the stored prompts.json: no dataset rebuild."""

from __future__ import annotations

import json

import diffmem.testbed.data as data
from diffmem.cli import main
from diffmem.testbed import labelled_prompts, shipped_testbed_spec


def test_stored_prompts_are_the_built_ones():
    spec = shipped_testbed_spec()
    assert labelled_prompts(spec) == data.build_testbed(spec).prompts


def test_listing_prompts_does_not_rebuild_the_testbed(tmp_path, monkeypatch, capsys):
    def no_rebuild(*args, **kwargs):
        raise AssertionError("the 4,020-item testbed was rebuilt to list prompts")

    monkeypatch.setattr(data, "build_testbed", no_rebuild)
    from diffmem.eval.detection import labelled_testbed_prompts

    prompts, labels, kinds = labelled_testbed_prompts(None)
    assert len(prompts) == 92 and sum(labels) == 32 and set(kinds) == {"verbatim", "template",
                                                                       "heldout"}
    out = tmp_path / "p.jsonl"
    assert main(["testbed", "prompts", "--out", str(out)]) == 0, capsys.readouterr().err
    assert [json.loads(r)["prompt"] for r in out.read_text().splitlines()] == prompts


def test_a_stale_store_is_not_used(tmp_path):
    from dataclasses import replace

    spec = replace(shipped_testbed_spec(), n_generic=10, n_heldout_compositions=3)
    assert labelled_prompts(spec) == data.build_testbed(spec).prompts  # built, not the stored list

"""The verdict by generation (GenerationJudge): ``explain --index``, its text, JSON and HTML."""

from __future__ import annotations

import base64
import json

import pytest

from diffmem.cli import main
from diffmem.detect import PreviewReplication
from diffmem.detect.verdict import GenerationJudge
from diffmem.explain import EditVerifier, explain_prompt, format_terminal, to_html
from diffmem.models.adapter import load_adapter

PROMPT = "the zanzibar quixotic poster"
FAST = ["--sampling-steps", "3"]


@pytest.fixture(scope="module")
def adapter(tiny_testbed):
    return load_adapter(tiny_testbed)


def test_judge_scores_are_preview_replication_and_carry_evidence(adapter, tiny_testbed_index):
    judge = GenerationJudge(tiny_testbed_index, num_inference_steps=3, generations=2)
    prompts = [PROMPT, "a red circle"]
    found = judge(adapter, prompts)
    ref = PreviewReplication(tiny_testbed_index, num_inference_steps=3,
                             generations=2).score(adapter, prompts)
    assert [v.margin for v in found] == pytest.approx(list(ref), abs=1e-6)
    for v in found:
        assert v.copies == (v.margin > 0) and v.criterion == "tiled_l2"
        assert v.preview.dtype.name == "uint8" and v.preview.shape[-1] == 3
        assert v.nearest is not None and v.nearest.shape == v.preview.shape
        d = v.to_dict(images=True)
        for key in ("preview_png", "nearest_png"):
            assert base64.b64decode(d[key])[:8] == b"\x89PNG\r\n\x1a\n"
        assert d["criterion_text"].startswith("tiled_l2 ")


def test_copying_prompt_with_a_low_first_step_score_gets_a_verified_edit(adapter,
                                                                        tiny_testbed_index):
    # copy threshold 10 (tiled L2 < 10): every preview copies; first-step threshold 1e9: the
    # estimate flags nothing. The verdict decides, and the edits are made and verified against it
    judge = GenerationJudge(tiny_testbed_index, num_inference_steps=3, generations=1,
                            threshold=10.0)
    verifier = EditVerifier(tiny_testbed_index, seeds=1, pool=1, max_checks=2,
                            num_inference_steps=3, threshold=-1.0)
    exp = explain_prompt(adapter, PROMPT, threshold=1e9, num_inference_steps=3, index=judge,
                         verify=verifier)
    assert exp.verdict.copies and exp.edits.flagged and exp.edits.estimate_flagged is False
    assert exp.edits.recommended is not None and exp.edits.recommended.verified
    text = format_terminal(exp, color=False)
    assert "verdict by generation (1 previews of 3 steps" in text and "COPIES" in text
    assert "first-step estimate (fast, not the verdict)" in text and "disagrees" in text
    assert "suggested edit:" in text and "no edit is needed" not in text
    d = exp.to_dict()
    assert d["detection"]["source"] == "generation" and d["detection"]["flagged"] is True
    assert d["detection"]["estimate"]["flagged"] is False and d["verdict"]["copies"] is True
    page = to_html(exp)
    assert "Verdict by generation: copies a training image" in page
    assert "class='preview'" in page and "class='nearest'" in page and "tiled_l2" in page


def test_explain_index_cli_says_where_the_verdict_comes_from(tiny_testbed, tiny_testbed_index,
                                                             tiny_dir, tmp_path, capsys):
    out = tmp_path / "e.json"
    rc = main(["explain", PROMPT, "--model", str(tiny_testbed), "--index",
               str(tiny_testbed_index), "--verify-checks", "1", "--verify-pool", "1",
               "--verify-seeds", "1", "--json", str(out), "--html", str(tmp_path / "e.html"),
               *FAST])
    text = capsys.readouterr().out
    assert rc == 0 and "verdict by generation (4 previews of 20 steps" in text
    assert "first-step estimate (fast, not the verdict)" in text
    report = json.loads(out.read_text())
    assert report["detection"]["source"] == "generation"
    assert report["verdict"]["criterion"] == "tiled_l2"
    assert "nearest training image" in (tmp_path / "e.html").read_text()
    # without an index: an estimate, and what an index would add
    rc = main(["explain", PROMPT, "--model", str(tiny_testbed), *FAST])
    text = capsys.readouterr().out
    assert rc == 0 and "first-step estimate: noise magnitude" in text
    assert "first-step estimate only" in text and "--index IDX" in text
    # another model's index: one line, exit 2, never a fall-back to the estimate
    rc = main(["explain", PROMPT, "--model", str(tiny_dir), "--index", str(tiny_testbed_index),
               *FAST])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("diffmem: error: explain --index: ")
    assert "first-step estimate" not in captured.out

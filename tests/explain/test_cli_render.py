"""Terminal/HTML rendering, ``diffmem explain`` and ``diffmem eval explanation``."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from diffmem.cli import main
from diffmem.eval.explanation import trigger_rank
from diffmem.explain import TokenAttributor, explain_prompt, format_terminal, to_html, use_color
from diffmem.models.adapter import load_adapter
from diffmem.testbed import spec_of

PROMPT = "the <zanzibar> quixotic poster"
FAST = ["--sampling-steps", "3"]


@pytest.fixture(scope="module")
def explanation(tiny_pipe):
    return explain_prompt(load_adapter(tiny_pipe), PROMPT, threshold=0.1, attention=True,
                          num_inference_steps=3)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_colours_only_on_a_tty_without_no_color(explanation, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_color(_Tty()) and not use_color(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color(_Tty())
    plain = format_terminal(explanation, color=False)
    assert "\033[" not in plain
    assert "zanzibar" in plain and "edits (" in plain
    coloured = format_terminal(explanation, color=True)
    assert coloured.count("\033[0m") >= len(explanation.attribution.words)


def test_html_is_self_contained(explanation):
    page = to_html(explanation)
    # attribution plot, generated image, one heat map per word, the colour bar
    assert page.count("data:image/png;base64,") == 3 + len(explanation.attribution.words)
    assert "colour bar" in page
    assert "&lt;zanzibar&gt;" in page and "<zanzibar>" not in page
    assert "src='http" not in page and 'src="http' not in page
    assert explanation.attention.maps.shape[0] == len(explanation.attribution.words)


def test_explain_command_writes_json_and_html(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    out, page = tmp_path / "e.json", tmp_path / "e.html"
    rc = main(["explain", PROMPT, "--model", str(tiny_dir), "--threshold", "0.1",
               "--json", str(out), "--html", str(page), *FAST])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["words"] == ["the", "<", "zanzibar", ">", "quixotic", "poster"]
    assert len(data["scores"]) == 6
    assert sum(data["scores"]) == pytest.approx(1.0, abs=1e-4)
    assert data["suggestions"] and {"prompt", "score", "clears"} <= set(data["suggestions"][0])
    assert page.read_text().startswith("<!doctype html>")
    assert "\033[" not in capsys.readouterr().out


@pytest.mark.parametrize("prompt", ["", "   ", "<|endoftext|>"])
def test_explain_command_reports_bad_prompts_in_one_line(tiny_dir, prompt, capsys):
    rc = main(["explain", prompt, "--model", str(tiny_dir), "--threshold", "1", *FAST])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # earlier lines: diffusers' loading progress bars
    assert rc == 2 and last.startswith("diffmem: error: prompt 0") and "no words to" in last


def test_explain_command_handles_a_long_prompt(tiny_dir, capsys):
    rc = main(["explain", " ".join(["red circle"] * 60), "--model", str(tiny_dir),
               "--threshold", "1", *FAST])
    assert rc == 0 and "longer than the text encoder's context" in capsys.readouterr().out


def test_explain_checks_edits_against_the_training_index(tiny_testbed, tiny_dir, tmp_path,
                                                         capsys):
    from diffmem.testbed.index import build_testbed_index

    adapter = load_adapter(tiny_testbed)
    build_testbed_index(tmp_path / "idx", spec=spec_of(adapter), rendered_by=adapter)
    out = tmp_path / "e.json"
    # threshold 0: the prompt is flagged and no edit clears; the first checked edit copies nothing
    rc = main(["explain", PROMPT, "--model", str(tiny_testbed), "--threshold", "0",
               "--verify-index", str(tmp_path / "idx"), "--verify-checks", "2",
               "--json", str(out), *FAST])
    text = capsys.readouterr().out
    # 4 seeds, then confirmed on the other 4 of the pool of 8
    assert rc == 0 and "generated 8x: no copy of a training image" in text
    checked = [s for s in json.loads(out.read_text())["suggestions"] if s["copies"] is not None]
    assert len(checked) == 1 and checked[0]["copies"] == 0 and checked[0]["generations"] == 8
    assert checked[0]["passed"] is True
    rc = main(["explain", PROMPT, "--model", str(tiny_testbed), "--threshold", "0",
               "--verify-index", str(tmp_path / "idx"), "--verify-checks", "1",
               "--verify-confirm", "0", "--json", str(out), *FAST])
    assert rc == 0 and "generated 4x: no copy" in capsys.readouterr().out
    # margin 100: no edit can pass; depth 2 attributes the closest miss and edits it again
    def run(depth):
        rc = main(["explain", PROMPT, "--model", str(tiny_testbed), "--threshold", "0",
                   "--verify-index", str(tmp_path / "idx"), "--verify-checks", "2",
                   "--verify-margin", "100", "--verify-depth", str(depth), "--verify-pool", "4",
                   "--verify-seeds", "2", "--json", str(out), *FAST])
        assert rc == 0 and "no generated edit passed" in capsys.readouterr().out
        return json.loads(out.read_text())["suggestions"]

    one, two = run(1), run(2)
    assert {s["prompt"] for s in one} < {s["prompt"] for s in two}
    checked_one = [s for s in one if s["copies"] is not None]
    new = [s for s in two if s["copies"] is not None and s["prompt"] not in
           {c["prompt"] for c in checked_one}]
    assert len(checked_one) == 2 and len(new) == 2 and all(not s["passed"] for s in new)
    bases = [tuple(c["words"]) for c in checked_one]
    deeper = [s for s in new if any(tuple(s["words"][: len(b)]) == b and len(s["words"]) > len(b)
                                    for b in bases)]
    assert deeper  # the second level's edits carry the words of both levels
    # a testbed index does not belong to another model: one line, exit 2
    rc = main(["explain", PROMPT, "--model", str(tiny_dir), "--threshold", "0",
               "--verify-index", str(tmp_path / "idx"), *FAST])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("diffmem: error: edit verification: ")
    rc = main(["explain", PROMPT, "--model", str(tiny_dir), "--verify-index",
               str(tmp_path / "nothing"), *FAST])
    assert rc == 2 and "is not a diffmem index" in capsys.readouterr().err


def test_eval_explanation(tiny_testbed, tmp_path):
    out = tmp_path / "r.json"
    assert main(["eval", "explanation", "--model", str(tiny_testbed), "--out", str(out),
                 "--prompts", "designed", "--judge-seeds", "2", *FAST]) == 0
    report = json.loads(out.read_text())
    assert report["n_memorized"] == 4
    recs = report["prompts"]
    ranked = [p for p in recs if p["triggers"] and p["words"] >= 5]
    assert report["n_trigger_5plus"] == len(ranked)
    if ranked:
        assert report["trigger_top3_rate"] == np.mean(
            [p["trigger_rank"] is not None and p["trigger_rank"] <= 3 for p in ranked])
    flagged = [p for p in recs if p["flagged"]]
    assert report["n_flagged"] == len(flagged)
    for p in recs:
        if p["flagged"]:  # the suggested edit was generated and judged
            assert p["edit"] is not None and isinstance(p["generation_cleared"], bool)
            assert 0 <= p["edit_copies"] <= 2
            assert p["generation_cleared"] == (p["edit_copies"] == 0)
        else:
            assert p["edit"] is None and p["generation_cleared"] is None
    if flagged:
        assert report["edit_detector_rate"] == np.mean([p["detector_cleared"] for p in flagged])
        assert report["edit_generation_rate"] == np.mean([p["generation_cleared"]
                                                          for p in flagged])
    assert set(report["groups"]) == {"verbatim", "template"}
    assert sum(g["n_copying"] for g in report["groups"].values()) == 4


def test_eval_needs_a_testbed(tiny_dir, capsys):
    rc = main(["eval", "explanation", "--model", str(tiny_dir), "--out", "unused.json"])
    err = capsys.readouterr().err  # diffusers' loading progress bar may precede the error line
    assert rc == 2 and err.count("diffmem: error") == 1 and "Traceback" not in err
    assert "needs a diffmem testbed model" in err.splitlines()[-1]


def test_trigger_rank(tiny_pipe):
    [attr] = TokenAttributor(tiny_pipe).attribute(["Zanzibar, the quixotic"])
    order = [attr.words[i] for i in attr.top_indices(10)]
    assert trigger_rank(attr, ["zanzibar"]) == order.index("Zanzibar") + 1
    assert trigger_rank(attr, ["QUIXOTIC", "zanzibar"]) == min(order.index("quixotic"),
                                                               order.index("Zanzibar")) + 1
    assert trigger_rank(attr, ["walrus"]) is None


def test_terminal_names_the_suggested_edit(tiny_pipe):
    adapter = load_adapter(tiny_pipe)
    exp = explain_prompt(adapter, PROMPT, threshold=-1.0)  # flagged, nothing clears
    text = format_terminal(exp, color=False)
    assert "first-step estimate: noise magnitude" in text and ": flagged" in text
    assert "suggested edit" not in text
    # a threshold between the prompt's score and its best edit's: flagged, the best edit clears
    thr = (exp.edits.score + exp.edits.best.score) / 2
    if exp.edits.best.score < exp.edits.score:
        exp = explain_prompt(adapter, PROMPT, threshold=thr)
        text = format_terminal(exp, color=False)
        assert "suggested edit:" in text and exp.edits.recommended.prompt in text
        assert "  ok" in text


def test_unflagged_prompt_says_so_and_marks_nothing_ok(tiny_pipe):
    exp = explain_prompt(load_adapter(tiny_pipe), PROMPT, threshold=1e9)
    text = format_terminal(exp, color=False)
    # without an index the verdict is an estimate, and it says so (never "no edit is needed")
    assert ": not flagged" in text and "first-step estimate only" in text
    assert "--index IDX" in text and "no edit is needed" not in text
    assert "  ok" not in text and "suggested edit" not in text
    assert all(s.clears is None for s in exp.edits.suggestions)


def test_heat_map_sits_over_a_grey_image():
    from diffmem.explain._render import overlay

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    cold = overlay(image, np.zeros((8, 8)))
    # where the map is 0 the picture shows through grey (R = G = B), never its own colours
    assert (cold[..., 0] == cold[..., 1]).all() and (cold[..., 1] == cold[..., 2]).all()
    hot = overlay(image, np.ones((8, 8)))
    assert not (hot[..., 0] == hot[..., 2]).all()  # the map's colour where it is hot

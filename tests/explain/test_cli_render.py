"""Terminal/HTML rendering, ``diffmem explain`` and ``diffmem eval explanation``."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import asdict

import numpy as np
import pytest

from diffmem.cli import main
from diffmem.explain import TokenAttributor, explain_prompt, format_terminal, to_html, use_color
from diffmem.explain._eval import trigger_rank
from diffmem.models.adapter import load_adapter
from diffmem.testbed.data import TestbedSpec as Spec

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
    assert "zanzibar" in plain and "suggested edits" in plain
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


@pytest.fixture(scope="module")
def tiny_testbed(tiny_dir, tmp_path_factory):
    """The tiny pipeline posing as a testbed trained on a small data spec."""
    folder = tmp_path_factory.mktemp("tb") / "pipe"
    shutil.copytree(tiny_dir, folder)
    spec = Spec(n_generic=20, n_verbatim=2, n_template=1, template_variants=4,
                       template_eval_variants=2, n_heldout_compositions=3)
    (folder / "testbed.json").write_text(json.dumps(asdict(spec)))
    return folder


def test_eval_explanation(tiny_testbed, tmp_path):
    out = tmp_path / "r.json"
    assert main(["eval", "explanation", "--model", str(tiny_testbed), "--out", str(out),
                 *FAST]) == 0
    report = json.loads(out.read_text())
    assert report["n_memorized"] == 4
    for key in ("trigger_top3_rate", "edit_success_rate", "trigger_top3_rate_all",
                "edit_below_clean_median_rate"):
        assert 0.0 <= report[key] <= 1.0
    ranks = [p["trigger_rank"] for p in report["prompts"]]
    assert report["trigger_top3_rate"] == np.mean([r is not None and r <= 3 for r in ranks])
    best = [p["best_edit"]["score"] <= report["threshold"] for p in report["prompts"]]
    assert report["edit_success_rate"] == np.mean(best)


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


def test_terminal_names_the_smallest_clearing_edit(tiny_pipe):
    exp = explain_prompt(load_adapter(tiny_pipe), PROMPT, threshold=1e9)
    text = format_terminal(exp, color=False)
    assert "smallest edit that clears it:" in text
    assert exp.edits.minimal.prompt in text and len(exp.edits.minimal.words) == 1
    exp = explain_prompt(load_adapter(tiny_pipe), PROMPT, threshold=-1.0)
    assert "smallest edit" not in format_terminal(exp, color=False)


def test_heat_map_sits_over_a_grey_image():
    from diffmem.explain._render import overlay

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    cold = overlay(image, np.zeros((8, 8)))
    # where the map is 0 the picture shows through grey (R = G = B), never its own colours
    assert (cold[..., 0] == cold[..., 1]).all() and (cold[..., 1] == cold[..., 2]).all()
    hot = overlay(image, np.ones((8, 8)))
    assert not (hot[..., 0] == hot[..., 2]).all()  # the map's colour where it is hot

"""The recovery check (``diffmem eval recovery``) on the tiny testbed: the loop runs, keeps its
budget, reports its fields; the guard path; a model without memorized items is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffmem.cli import main
from diffmem.eval.recovery import evaluate_recovery, memorized_items
from diffmem.runtime.errors import ConfigError

FAST = {"iterations": 3, "check_every": 2, "seeds": 1, "max_items": 2, "steps": 2}


def test_loop_keeps_its_budget_and_reports(tiny_testbed, tmp_path):
    out = tmp_path / "r.json"
    r = evaluate_recovery(tiny_testbed, out=out, **FAST)
    assert r["n_items"] == 2 and r["budget"] == 3
    assert r["iterations_done"] <= 3 and r["optimisation_unet_calls"] == r["iterations_done"]
    if not r["stopped_early"]:
        assert [c["iteration"] for c in r["curve"]] == [0, 2, 3]  # start, every 2, the end
    for key in ("recovered_share", "recovered_at_start", "recovered_at_end",
                "iterations_to_recovery_median", "items_source", "settings", "criterion"):
        assert key in r
    assert 0.0 <= r["recovered_share"] <= 1.0
    item = r["items"][0]
    assert set(item) >= {"id", "caption", "recovered", "first_recovery_iteration",
                         "distance_at_start", "best_distance", "distances"}
    assert len(item["distances"]) == len(r["curve"])
    assert item["recovered"] == (item["first_recovery_iteration"] is not None)
    assert json.loads(out.read_text())["n_items"] == 2


def test_optimize_noise_and_guard(tiny_testbed):
    r = evaluate_recovery(tiny_testbed, optimize_noise=True, mitigate="auto", threshold=-1.0,
                          **{**FAST, "iterations": 2})
    assert r["optimisation_unet_calls"] == 2 * r["iterations_done"]
    assert r["settings"]["optimize_noise"] and r["mitigation"] == "auto"
    # threshold -1: the guard's watch flags every generation, which then gets the ladder's first rung
    assert r["curve"][0]["guard"] == {"mitigated": 2}


def test_set_inputs_is_plain_generation_with_the_prompts_embedding(tiny_testbed):
    from diffmem.core.hooks import SetInputs
    from diffmem.core.sampling import sample, seeded_generators
    from diffmem.models.adapter import load_adapter

    adapter = load_adapter(tiny_testbed)
    prompts = ["a red circle", "a blue square"]
    kw = {"num_inference_steps": 2, "generator": None}
    plain = sample(adapter, prompts, **{**kw, "generator": seeded_generators([0, 1])})
    given = sample(adapter, ["", ""], **{**kw, "generator": seeded_generators([0, 1])},
                   hooks=[SetInputs(adapter.encode(prompts))])
    assert torch.equal(plain.images, given.images)


def test_planted_manifest_gives_the_items(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(data / "images" / "planted-00.png")
    (data / "manifest.json").write_text(json.dumps({"planted": [
        {"id": "planted-00", "caption": "the a b poster", "image": "images/planted-00.png"}]}))
    pipe = tmp_path / "pipeline"
    pipe.mkdir()
    (pipe / "diffmem_train.json").write_text(json.dumps({"data": str(data / "data.jsonl")}))
    source, items = memorized_items(pipe)
    assert "planted manifest" in source
    assert [(i.id, i.caption, i.image.shape) for i in items] == [
        ("planted-00", "the a b poster", (16, 16, 3))]


def test_model_without_memorized_items_is_one_line_exit_2(tiny_dir, capsys):
    with pytest.raises(ConfigError, match="known memorized items"):
        memorized_items(tiny_dir)
    rc = main(["eval", "recovery", "--model", str(tiny_dir), "--iterations", "1"])
    _, err = capsys.readouterr()
    assert rc == 2
    assert err.count("\n") == 1 and "known memorized items" in err


def test_recovery_plot_and_tables(tmp_path, capsys):
    def rep(curve, budget=50):
        n = 4
        return {"n_items": n, "recovered_share": curve[-1][1], "recovered_at_start": curve[0][1],
                "recovered_at_end": curve[-1][1], "iterations_to_recovery_median": 25.0,
                "budget": budget, "curve": [{"iteration": i, "share_recovered_by": s}
                                            for i, s in curve]}

    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    a.write_text(json.dumps(rep([(0, 0.0), (25, 1.0)])))  # stopped early: all recovered
    b.write_text(json.dumps(rep([(0, 0.0), (25, 0.25), (50, 0.5)])))
    assert main(["eval", "recovery-plot", f"early={a}", str(b), "--out",
                 str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "| early | 4 | 1.000 |" in out
    assert "| early | 0.00 | 1.00 | 1.00 |" in out and "| b | 0.00 | 0.25 | 0.50 |" in out
    # the same curves as a Mermaid chart: x the checked iterations, a line per configuration
    assert '    x-axis "optimisation iterations" [0, 25, 50]' in out
    assert "    line [0.000, 1.000, 1.000]\n    line [0.000, 0.250, 0.500]\n```" in out
    assert (tmp_path / "p.png").stat().st_size > 0

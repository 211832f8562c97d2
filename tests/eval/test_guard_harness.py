"""`diffmem eval guard` / `eval mitigation --broad`: the guard per group of the broad set."""

from __future__ import annotations

import json

import pytest

from diffmem.cli import main


@pytest.fixture
def labelled_graded(graded_model, few_broad_prompts):
    """The tiny graded testbed labelled on 6 prompts of its broad set (2 clean controls)."""
    assert main(["testbed", "label", "--model", "testbed-graded", "--install", "--seeds", "2",
                 "--sampling-steps", "2"]) == 0
    return graded_model


def test_eval_mitigation_broad_reports_the_guard_per_group(labelled_graded, tmp_path, capsys):
    out = tmp_path / "g.json"
    assert main(["eval", "mitigation", "--broad", "--model", "testbed-graded", "--split", "all",
                 "--seeds", "2", "--sampling-steps", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    labels = [json.loads(x) for x in (labelled_graded / "broad_labels.jsonl").read_text()
              .splitlines()]
    groups = {r["group"] for r in labels if r["memorized"]}
    assert groups <= {r["group"] for r in rows}  # every copying group is reported
    assert "heldout" in {r["group"] for r in rows}
    for r in rows:
        assert r["setting"] == "no-index"  # no index given: the run without it only
        assert r["n_images"] == 2 * r["n_prompts"]
        for key in ("served_copy_rate", "unresolved", "mitigated", "cost"):
            assert key in r
        if r["bit_identical"] is not None:
            assert 0.0 <= r["bit_identical"] <= 1.0
    assert report["config"]["agreement"] is True


def test_eval_mitigation_broad_refuses_other_methods(labelled_graded, tmp_path, capsys):
    assert main(["eval", "mitigation", "--broad", "--methods", "ren", "--model", "testbed-graded",
                 "--out", str(tmp_path / "g.json")]) == 2
    assert "--broad" in capsys.readouterr().err and not (tmp_path / "g.json").exists()
    assert main(["eval", "mitigation", "--out", str(tmp_path / "m.json")]) == 2
    assert "--methods" in capsys.readouterr().err

"""`diffmem generate --mitigate` and `diffmem eval mitigation` at the command line."""

from __future__ import annotations

import json

import pytest

from diffmem.cli import main


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_with_mitigation_writes_its_report(tiny_dir, tmp_path, capsys):
    out = tmp_path / "gen"
    rc, _, _ = run(capsys, "generate", "a red circle", "a blue square", "--out", out,
                   "--model", tiny_dir, "--steps", 2, "--mitigate", "ren:0.5")
    assert rc == 0
    rows = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["mitigation.ren"]["applied"] for r in rows] == [True, True]
    assert all(r["mitigation.ren"]["strength"] == 0.5 for r in rows)


@pytest.mark.parametrize("spec, message", [
    ("magic", "unknown mitigation 'magic'"),
    ("ren:-1", "finite number >= 0"),
    ("auto", "no calibrated threshold"),
    ("amg", "index"),
])
def test_generate_bad_mitigation_is_one_line_and_writes_nothing(tiny_dir, tmp_path, capsys,
                                                                 spec, message):
    out = tmp_path / "gen"
    rc, _, err = run(capsys, "generate", "a red circle", "--out", out, "--model", tiny_dir,
                     "--steps", 2, "--mitigate", spec)
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("diffmem: error:") and message in last
    assert "Traceback" not in err and not out.exists()


def test_eval_mitigation_refuses_a_model_that_is_no_testbed(tiny_dir, tmp_path, capsys):
    rc, _, err = run(capsys, "eval", "mitigation", "--methods", "ren", "--model", tiny_dir,
                     "--out", tmp_path / "m.json")
    assert rc == 2 and "testbed" in err.strip().splitlines()[-1]
    assert not (tmp_path / "m.json").exists()

"""Dose-response (copy rate per training duplicate count) on synthetic label rows, and
``diffmem eval dose``."""

from __future__ import annotations

import json
import math

import pytest

from diffmem.cli import main
from diffmem.eval.dose import dose_report, dose_response, plot_dose_response
from diffmem.runtime.errors import PromptError


def _row(prompt, duplicates, copies, seeds=4, group="caption", **extra):
    return {"prompt": prompt, "group": group, "duplicates": duplicates, "copies": copies,
            "seeds": seeds, "memorized": copies > 0, **extra}


ROWS = [
    _row("a1", 1, 0), _row("a2", 1, 1),
    _row("b1", 4, 2), _row("b2", 4, 0, group="synonym"),
    _row("c1", 16, 4), _row("c2", 16, 3, group="synonym"),
    _row("clean1", 0, 0, group="clean"), _row("clean2", 0, 1, group="clean"),
]


def test_dose_response_counts_generations_per_count():
    rows = dose_response(ROWS)
    assert [r["duplicates"] for r in rows] == [1, 4, 16]  # clean controls (0) left out
    one, four, sixteen = rows
    assert (one["n_prompts"], one["n_generations"], one["n_copies"]) == (2, 8, 1)
    assert one["copy_rate"] == 1 / 8 and one["prompt_copy_rate"] == 0.5
    assert four["copy_rate"] == 2 / 8 and sixteen["copy_rate"] == 7 / 8
    assert sixteen["prompt_copy_rate"] == 1.0 and "own_copy_rate" not in one


def test_per_image_flags_win_over_the_counts():
    flags = [[True, True]] * 2 + [[False, False]] * 6
    rows = dose_response(ROWS, flags)
    assert [r["copy_rate"] for r in rows] == [1.0, 0.0, 0.0]
    assert rows[0]["n_generations"] == 4
    # a 'copied' list in the row itself
    rows = dose_response([{"prompt": "x", "duplicates": 8, "copied": [True, False, False]}])
    assert rows == [{"duplicates": 8, "n_prompts": 1, "n_generations": 3, "n_copies": 1,
                     "copy_rate": 1 / 3, "prompt_copy_rate": 1.0}]
    with pytest.raises(PromptError, match="flag lists"):
        dose_response(ROWS, flags[:2])


def test_own_image_copies_from_distances_and_nearest():
    row = _row("x", 32, 2, seeds=3, source="graded-032-0", threshold=0.15,
               distances=[0.05, 0.1, 0.3], nearest=["graded-032-0", "graded-064-1", "graded-032-0"])
    (r,) = dose_response([row])
    assert r["copy_rate"] == 2 / 3 and r["own_copy_rate"] == 1 / 3


def test_report_groups_and_clean_baseline():
    rep = dose_report(ROWS)
    assert rep["n_rows"] == 8 and [r["duplicates"] for r in rep["counts"]] == [1, 4, 16]
    assert set(rep["groups"]) == {"caption", "synonym"}
    assert [r["duplicates"] for r in rep["groups"]["synonym"]] == [4, 16]
    assert rep["clean"]["copy_rate"] == 1 / 8 and rep["clean"]["n_prompts"] == 2


def test_rows_without_duplicates_are_one_clear_error():
    with pytest.raises(PromptError, match="duplicates"):
        dose_response([{"prompt": "x", "copies": 1, "seeds": 4}])
    with pytest.raises(PromptError, match="copy outcome"):
        dose_response([{"prompt": "x", "duplicates": 2}])


def test_plot_one_line_per_method(tmp_path):
    path = plot_dose_response({"plain": dose_response(ROWS),
                               "mitigated": dose_response(ROWS, [[False] * 4] * 8)},
                              tmp_path / "dose.png", baselines={"plain": 0.1})
    assert path.is_file() and path.stat().st_size > 1000


def test_cli_eval_dose(tmp_path, capsys):
    plain, other = tmp_path / "plain.jsonl", tmp_path / "other.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    other.write_text("".join(json.dumps({**r, "copies": 0}) + "\n" for r in ROWS))
    out, png = tmp_path / "dose.json", tmp_path / "dose.png"
    assert main(["eval", "dose", "--labels", str(plain), "--labels", f"mitigated={other}",
                 "--group", "caption", "--out", str(out), "--plot", str(png)]) == 0
    rep = json.loads(out.read_text())
    assert set(rep["methods"]) == {"plain", "mitigated"} and png.is_file()
    counts = rep["methods"]["plain"]["counts"]
    assert [r["duplicates"] for r in counts] == [1, 4, 16]  # caption rows only
    assert counts[2]["copy_rate"] == 1.0 and rep["methods"]["plain"]["clean"]["copy_rate"] == 1 / 8
    assert all(r["copy_rate"] == 0 for r in rep["methods"]["mitigated"]["counts"])
    assert "plain: copy rate by duplicate count 1: 0.125" in capsys.readouterr().out
    assert not math.isnan(rep["methods"]["mitigated"]["clean"]["copy_rate"])
    assert rep["table"].splitlines()[0] == "| duplicates | plain | mitigated |"
    assert "| 16 | 1.000 | 0.000 |" in rep["table"]
    assert rep["chart"].startswith("```mermaid") and "    line [0.000, 0.000, 0.000]" in rep["chart"]


def test_the_table_has_a_column_per_method_and_a_dash_where_a_count_is_missing():
    from diffmem.eval.dose import dose_table

    table = dose_table({"plain": dose_response(ROWS), "one": dose_response(ROWS[:2])})
    assert table.splitlines()[2:] == ["| 1 | 0.125 | 0.125 |", "| 4 | 0.250 | – |",
                                      "| 16 | 0.875 | – |"]


def test_the_chart_is_a_mermaid_line_per_method_with_every_count():
    from diffmem.eval.dose import dose_chart

    chart = dose_chart({"plain": dose_response(ROWS), "one": dose_response(ROWS[:2]),
                        "zero": dose_response([{**r, "copies": 0} for r in ROWS])})
    lines = chart.splitlines()
    assert lines[:2] == ["```mermaid", "xychart-beta"] and lines[-1] == "```"
    assert '    x-axis "duplicates" [1, 4, 16]' in lines
    # a line per method with a value at every count, in order; "one" lacks 4 and 16
    assert [x for x in lines if x.startswith("    line")] == [
        "    line [0.125, 0.250, 0.875]", "    line [0.000, 0.000, 0.000]"]
    assert "lines in order: plain; zero (left out, a missing value: one)" in chart

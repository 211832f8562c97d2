"""The planted-duplicates benchmark's bookkeeping: its table, report and configs (the runs themselves
are measured by `diffmem eval training`, docs/training.md)."""

from __future__ import annotations

import json

import pytest

from diffmem.runtime.errors import ConfigError
from diffmem.train.bench import (
    METHODS,
    TRAIN,
    _table,
    markdown_report,
    method_config,
    plot_benchmark,
)


def _row(mem, fpd, sec, dropped=0, dedup=0.0):
    return {"planted_memorization_rate": mem, "heldout_alignment": 0.3, "heldout_fpd": fpd,
            "seconds_training": sec, "seconds_dedup": dedup, "samples": 1000,
            "samples_dropped": dropped}


ROWS = {"base (no fine-tune)": {"planted_memorization_rate": 0.0, "heldout_alignment": 0.34,
                                "heldout_fpd": 200.0},
        "plain": _row(1.0, 180.0, 200.0),
        "dedup": _row(0.0, 189.0, 190.0, dedup=10.0),
        "magnitude": _row(0.05, 175.0, 250.0, dropped=100)}


def test_table_ratios_are_against_the_plain_run():
    t = {r["method"]: r for r in _table(ROWS)}
    assert "time_vs_plain" not in t["base (no fine-tune)"]
    assert t["dedup"]["time_vs_plain"] == 1.0  # 190 s + 10 s of dedup
    assert t["dedup"]["fpd_vs_plain"] == pytest.approx(1.05)
    assert t["magnitude"]["time_vs_plain"] == 1.25
    assert t["magnitude"]["dropped_share"] == 0.1


def test_markdown_ratios_are_rounded_once():
    rows = {"plain": _row(1.0, 180.9058536, 200.0), "loss": _row(0.0, 185.4796166, 200.0)}
    md = markdown_report({"table": _table(rows)})
    assert "| 185.5 | 1.03 |" in md  # 1.02528: not 1.025 first, then 1.02


def test_markdown_report_has_every_method_and_its_bar(tmp_path):
    report = {"table": _table(ROWS)}
    md = markdown_report(report, width=20)
    for name in ROWS:
        assert f"| {name} |" in md
    bars = [line for line in md.splitlines() if line.startswith("plain ") or
            line.startswith("magnitude ")]
    assert bars[0].count("█") == 20 and bars[1].count("█") == 1  # 1.0 and 0.05 of 20 blocks
    path = plot_benchmark(report, tmp_path / "chart.png")
    assert path.stat().st_size > 1000


def test_method_config_uses_the_calibrated_thresholds():
    cal = {"magnitude_threshold": 12.34567, "entropy_threshold": 2.5}
    cfg = method_config("magnitude", calibration=cal)
    assert cfg.magnitude_filter == 12.3457 and cfg.steps == TRAIN["steps"]
    assert method_config("entropy", calibration=cal, steps=7).entropy_filter == 2.5
    assert method_config("dedup").dedup == "pixel"
    assert set(METHODS) >= {"plain", "dedup", "magnitude", "entropy", "mc", "rc", "rt", "cwr",
                            "gn"}
    with pytest.raises(ConfigError, match="needs calibrate_filters"):
        method_config("magnitude")
    with pytest.raises(ConfigError, match="unknown benchmark method"):
        method_config("nope")


def test_planted_set_uses_the_frame_and_repeats_each_image(tmp_path):
    from diffmem.train.bench import build_planted_set

    m = build_planted_set(tmp_path / "d", n_generic=2, k=2, copies=3,
                          frame="a photo of {a} and {b}")
    assert m["frame"] == "a photo of {a} and {b}" and m["rows"] == 2 + 2 * 3
    assert all(p["caption"].startswith("a photo of ") and " and " in p["caption"]
               for p in m["planted"])
    default = build_planted_set(tmp_path / "e", n_generic=2, k=2, copies=1)
    assert default["planted"][0]["caption"].endswith(" poster")
    # the planted trigger words are the same under either frame (same seed)
    assert default["planted"][0]["caption"].split()[1] in m["planted"][0]["caption"].split()


def test_the_planted_set_of_the_graded_testbed_avoids_its_words_and_its_scenes():
    from diffmem.testbed import shipped_testbed_spec, spec_of
    from diffmem.testbed.data import rare_word_vocabulary
    from diffmem.testbed.graded import GRADED_TRIGGER_WORDS
    from diffmem.train.planted import PLANTED, planted_seed, planted_words

    graded, shipped = spec_of("testbed-graded"), shipped_testbed_spec()
    # the graded testbed's data has the planted seed: its generic scenes would not be new
    assert graded.seed == PLANTED["seed"] and planted_seed(graded) != graded.seed
    assert planted_seed(shipped) == PLANTED["seed"]  # the first testbed's benchmark is unchanged
    assert planted_words(8, 1, shipped) == planted_words(8, 1)
    words = set(planted_words(8, planted_seed(graded), graded))
    assert not words & set(GRADED_TRIGGER_WORDS)
    assert not words & set(rare_word_vocabulary(graded.n_rare_words, graded.seed))


def test_eval_training_keeps_one_base_model_per_folder(tmp_path, tiny_graded_testbed):
    import json

    from diffmem.runtime.errors import ConfigError, ModelLoadError
    from diffmem.train.bench import run_benchmark

    out = tmp_path / "bench"
    out.mkdir()
    (out / "base_model.json").write_text(json.dumps({"model": "testbed"}))
    with pytest.raises(ConfigError, match="another --out"):
        run_benchmark(out, model=tiny_graded_testbed, methods=["plain"])
    assert sorted(p.name for p in out.iterdir()) == ["base_model.json"]  # nothing written
    with pytest.raises(ModelLoadError, match="not found"):
        run_benchmark(tmp_path / "other", model=tmp_path / "nowhere")
    assert not (tmp_path / "other").exists()


def test_a_planted_set_with_one_count_per_image(tmp_path):
    from diffmem.train.bench import build_planted_set

    m = build_planted_set(tmp_path / "d", n_generic=2, copies=[1, 3])
    assert m["rows"] == 2 + 1 + 3 and m["copies"] == [1, 3] and m["k"] == 2
    assert [p["copies"] for p in m["planted"]] == [1, 3]
    rows = [json.loads(x) for x in (tmp_path / "d" / "data.jsonl").read_text().splitlines()]
    assert sorted(sum(r.get("planted") == p["id"] for r in rows) for p in m["planted"]) == [1, 3]
    assert build_planted_set(tmp_path / "d", n_generic=2, copies=[1, 3]) == m  # reused
    with pytest.raises(ConfigError, match="copies"):
        build_planted_set(tmp_path / "d", n_generic=2, copies=[1, 4])
    with pytest.raises(ConfigError, match=">= 1"):
        build_planted_set(tmp_path / "e", n_generic=2, copies=[0, 4])


def test_the_report_shows_the_dose_table_and_the_cli_checks_the_counts(capsys):
    from diffmem.cli import main
    from diffmem.train.bench_report import markdown_report

    table = [{"method": "plain", "planted_memorization": 0.5, "heldout_alignment": 0.3,
              "heldout_fpd": 180.0}]
    dose = "| duplicates | plain |\n|---|---|\n| 1 | 0.000 |"
    text = markdown_report({"table": table, "dose": dose})
    assert "by the planted image's copies" in text and "| 1 | 0.000 |" in text
    chart = markdown_report({"table": table, "dose": dose, "dose_chart": "```mermaid\nxychart"})
    assert chart.endswith("```mermaid\nxychart\n") and "```mermaid" not in text
    assert "copies" not in markdown_report({"table": table})
    assert main(["eval", "training", "--out", "x", "--planted-copies", "1,0"]) == 2
    assert "expected comma-separated integers >= 1" in capsys.readouterr().err

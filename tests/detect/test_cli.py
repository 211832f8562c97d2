"""``diffmem detect`` and ``diffmem generate --detect``: file formats and one-line errors."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffmem.cli import main
from diffmem.detect.prompts import read_labelled, read_prompts

PROMPTS = ["a red circle on a gray background", "the narwhal zanzibar poster", "a cat"]


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def txt(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")
    return f


def read_csv(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_detect_txt_to_csv(tiny_dir, txt, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    rc, stdout, _ = run_cli(capsys, "detect", txt, "--out", out, "--model", tiny_dir,
                            "--sampling-steps", 4)
    assert rc == 0 and json.loads(stdout)["n_prompts"] == 3
    rows = read_csv(out)
    assert [r["prompt"] for r in rows] == PROMPTS
    assert all(float(r["score"]) > 0 for r in rows)


def test_detect_jsonl_parquet_and_threshold(tiny_dir, tmp_path, capsys):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps({"caption": p, "x": 1}) + "\n" for p in PROMPTS),
                     encoding="utf-8")
    clean = tmp_path / "clean.parquet"
    pq.write_table(pa.table({"prompt": ["a dog", "a blue square", "a house"]}), clean)
    out = tmp_path / "scores.parquet"
    rc, stdout, _ = run_cli(capsys, "detect", jsonl, "--out", out, "--model", tiny_dir,
                            "--detector", "attention_entropy", "--steps", "2",
                            "--generations", 2, "--sampling-steps", 4,
                            "--threshold-from", clean)
    assert rc == 0
    summary = json.loads(stdout)
    table = pq.read_table(out).to_pylist()
    assert [r["prompt"] for r in table] == PROMPTS
    assert all((r["score"] > summary["threshold"]) == r["flagged"] for r in table)
    assert summary["n_calibration"] == 3


def test_read_labelled_formats(tmp_path):
    f = tmp_path / "l.jsonl"
    f.write_text('{"prompt": "a", "kind": "verbatim"}\n{"prompt": "b", "label": 0}\n'
                 '{"caption": "c", "memorized": true}\n', encoding="utf-8")
    assert read_labelled(f) == (["a", "b", "c"], [True, False, True],
                                ["verbatim", "clean", "memorized"])


@pytest.mark.parametrize(("content", "message"), [
    (b"", "contains no prompts"),
    (b"\n  \n", "contains no prompts"),
    (b"caf\xe9 au lait\n", "not UTF-8"),
])
def test_bad_prompt_files_give_one_line(tiny_dir, tmp_path, capsys, content, message):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    rc, _, err = run_cli(capsys, "detect", f, "--out", tmp_path / "o.csv", "--model", tiny_dir)
    assert rc == 2
    assert err.count("\n") == 1 and message in err and err.startswith("diffmem: error:")
    assert not (tmp_path / "o.csv").exists()


def test_bad_jsonl_and_missing_file(tmp_path):
    from diffmem.runtime.errors import PromptError

    f = tmp_path / "p.jsonl"
    f.write_text('{"text": "no prompt field"}\n', encoding="utf-8")
    with pytest.raises(PromptError, match="'prompt' or 'caption'"):
        read_prompts(f)
    with pytest.raises(PromptError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


def test_unknown_detector_and_bad_steps(tiny_dir, txt, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "detect", txt, "--out", tmp_path / "o.csv", "--model", tiny_dir,
                         "--detector", "magic")
    assert rc == 2 and err.count("\n") == 1 and "unknown detector 'magic'" in err
    assert "noise_magnitude" in err  # lists the choices
    rc, _, err = run_cli(capsys, "detect", txt, "--out", tmp_path / "o.csv", "--model", tiny_dir,
                         "--steps", "some")
    assert rc == 2 and "steps must be a positive int, 'all', 'first:N' or 'last:N'" in err


def test_generate_with_detect_writes_scores(tiny_dir, tmp_path, capsys):
    out = tmp_path / "gen"
    rc, _, _ = run_cli(capsys, "generate", *PROMPTS[:2], "--out", out, "--model", tiny_dir,
                       "--sampling-steps", 3, "--detect", "noise_magnitude")
    assert rc == 0
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["noise_magnitude"] > 0 for r in rows)
    assert (out / rows[0]["file"]).is_file()
    # without --detect the plain command still runs
    rc, _, _ = run_cli(capsys, "generate", PROMPTS[0], "--out", tmp_path / "plain",
                       "--model", tiny_dir, "--sampling-steps", 2)
    rows = [json.loads(line) for line in
            (tmp_path / "plain" / "generations.jsonl").read_text().splitlines()]
    assert rc == 0 and "noise_magnitude" not in rows[0]


@pytest.mark.parametrize("row", ['{"prompt": "a", "label": "yes"}',
                                 '{"prompt": "a", "memorized": "maybe"}',
                                 '{"prompt": "a", "label": null}'])
def test_bad_label_value_is_a_prompt_error(tmp_path, capsys, row):
    from diffmem.runtime.errors import PromptError

    f = tmp_path / "l.jsonl"
    f.write_text(row + "\n", encoding="utf-8")
    with pytest.raises(PromptError, match="expected 0/1 or true/false"):
        read_labelled(f)
    rc, _, err = run_cli(capsys, "eval", "detection", "--prompts", f, "--out", tmp_path / "r.json")
    assert rc == 2 and err.count("\n") == 1 and "expected 0/1 or true/false" in err


def test_label_values_as_tables_write_them(tmp_path):
    f = tmp_path / "l.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c", "d"], "label": ["1", "0", "1.0", "False"]}),
                   f)
    assert read_labelled(f)[1] == [True, False, True, False]


def test_generate_hooks_come_from_one_registry_function():
    from diffmem import cli
    from diffmem.detect import AttentionEntropy, NoiseMagnitude
    from diffmem.generate import build_hooks
    from diffmem.runtime.errors import ConfigError

    assert build_hooks() == []
    [det] = build_hooks(detect="noise-magnitude", num_inference_steps=7, guidance_scale=3.0)
    assert isinstance(det, NoiseMagnitude)
    assert (det.num_inference_steps, det.guidance_scale) == (7, 3.0)
    [late] = build_hooks(detect="attention_entropy_late")
    assert isinstance(late, AttentionEntropy) and late.name == "attention_entropy_late"
    with pytest.raises(ConfigError, match="unknown detector 'magic'"):
        build_hooks(detect="magic")
    # `generate` keeps its own handler; no other command rewires it
    ns = cli.build_parser().parse_args(["generate", "a cat", "--detect", "noise_magnitude"])
    assert ns.func is cli._cmd_generate and ns.detect == "noise_magnitude"
    assert not hasattr(ns, "plain_generate")


def test_generate_unknown_detector_is_one_line(tiny_dir, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "generate", "a cat", "--out", tmp_path / "g", "--model", tiny_dir,
                         "--sampling-steps", 2, "--detect", "magic")
    assert rc == 2 and err.count("\n") == 1 and "unknown detector 'magic'" in err
    assert not (tmp_path / "g").exists()


def test_detect_with_an_index_previews_and_searches(tiny_testbed, tiny_testbed_index, txt,
                                                    tmp_path, capsys):
    out = tmp_path / "scores.csv"
    rc, stdout, _ = run_cli(capsys, "detect", txt, "--out", out, "--model", tiny_testbed,
                            "--index", tiny_testbed_index, "--generations", 2,
                            "--sampling-steps", 3)
    summary = json.loads(stdout)
    assert rc == 0 and summary["detector"] == "preview_replication"  # the default with an index
    rows = read_csv(out)
    # margins to the copy threshold 0.15 of tiled L2: at most 0.15 (a distance is >= 0)
    assert len(rows) == 3 and all(float(r["score"]) <= 0.15 for r in rows)
    # the decision is the generation's: flagged exactly where the previews copy (margin > 0)
    assert [r["flagged"] == "True" for r in rows] == [float(r["score"]) > 0 for r in rows]
    assert summary["threshold"] == 0.0 and summary["verdict"].startswith("generation")
    # the report of eval detection names it and counts its UNet rows: 2 previews x 3 steps x 2
    rep = tmp_path / "rep.json"
    rc, stdout, _ = run_cli(capsys, "eval", "detection", "--out", rep, "--model", tiny_testbed,
                            "--prompts", "designed", "--index", tiny_testbed_index,
                            "--generations", 2, "--sampling-steps", 3)
    report = json.loads(rep.read_text())
    assert rc == 0 and report["detector"] == "preview_replication"
    assert report["unet_rows_per_prompt"] == 2 * 3 * 2 and report["num_inference_steps"] == 3


def test_preview_replication_without_an_index_is_one_line(tiny_dir, txt, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "detect", txt, "--out", tmp_path / "o.csv", "--model", tiny_dir,
                         "--detector", "preview_replication")
    assert rc == 2 and err.count("\n") == 1 and "needs the training set's index" in err
    rc, _, err = run_cli(capsys, "detect", txt, "--out", tmp_path / "o.csv", "--model", tiny_dir,
                         "--index", tmp_path / "nothing")
    assert rc == 2 and "is not a diffmem index" in err


def test_generate_checks_its_own_images_with_preview_replication(tiny_testbed, tiny_testbed_index,
                                                                 tmp_path, capsys):
    out = tmp_path / "gen"
    rc, _, err = run_cli(capsys, "generate", PROMPTS[0], "--out", out, "--model", tiny_testbed,
                         "--sampling-steps", 3, "--detect", "preview_replication",
                         "--index", tiny_testbed_index)
    assert rc == 0 and "scoring apart" not in err  # the run's own final image, no extra run
    [row] = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert row["preview_replication"] <= 0.15  # 0.15 - tiled L2 distance


def test_detect_with_step_indices(tiny_dir, txt, tmp_path, capsys):
    """``--steps 0,2,3`` (indices, as --help documents) is parsed once and scores those steps."""
    from diffmem.detect import make_detector

    out = tmp_path / "scores.csv"
    rc, _, err = run_cli(capsys, "detect", txt, "--out", out, "--model", tiny_dir,
                         "--detector", "noise_magnitude", "--generations", 1,
                         "--sampling-steps", 4, "--steps", "0,2,3")
    assert rc == 0, err
    scores = [float(r["score"]) for r in read_csv(out)]
    expected = make_detector("noise_magnitude", steps=(0, 2, 3), generations=1,
                             num_inference_steps=4).score(tiny_dir, PROMPTS)
    assert scores == pytest.approx([float(x) for x in expected], rel=1e-6)

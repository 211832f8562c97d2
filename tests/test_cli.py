"""The command line as a user meets it: bad input -> exit code 2 and ONE line (no traceback, nothing
written); help on every option with defaults; one meaning per option; quiet output; Ctrl-C.

The table of bad inputs below is also docs/cli.md's table."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffmem.cli import build_parser, main

# (id, argv, fragment of the one error line). Placeholders: {tmp} an empty scratch folder,
# {txt} a prompt file, {file} an existing file, {empty} an empty folder, {emptytxt} an empty
# prompt file, {csv} a CSV without a prompt column, {tiny} a tiny SD pipeline folder,
# {other} a folder of an unsupported pipeline class.
BAD_INPUTS = [
    ("guidance-nan", ["generate", "a", "--out", "{tmp}/g", "--guidance-scale", "nan"],
     "argument --guidance-scale: expected a number >= 0 and <= 1000, got 'nan' (not a finite"),
    ("guidance-inf", ["generate", "a", "--out", "{tmp}/g", "--guidance-scale", "inf"],
     "not a finite number"),
    ("guidance-negative", ["generate", "a", "--out", "{tmp}/g", "--guidance-scale", "-1"],
     "argument --guidance-scale: expected a number >= 0"),
    ("sampling-steps-negative", ["generate", "a", "--out", "{tmp}/g", "--sampling-steps", "-3"],
     "argument --sampling-steps: expected an integer >= 1 and <= 10000, got '-3'"),
    ("sampling-steps-zero", ["generate", "a", "--out", "{tmp}/g", "--sampling-steps", "0"],
     "argument --sampling-steps: expected an integer >= 1"),
    ("old-steps-spelling-zero", ["generate", "a", "--out", "{tmp}/g", "--steps", "0"],
     "argument --steps: expected an integer >= 1"),
    ("sampling-steps-text", ["detect", "{txt}", "--out", "{tmp}/o.csv", "--sampling-steps", "ten"],
     "argument --sampling-steps: expected an integer >= 1 and <= 10000, got 'ten'"),
    ("detect-sampling-steps-zero", ["detect", "{txt}", "--out", "{tmp}/o.csv",
                                    "--sampling-steps", "0"], "expected an integer >= 1"),
    ("batch-size-zero", ["detect", "{txt}", "--out", "{tmp}/o.csv", "--batch-size", "0"],
     "argument --batch-size: expected an integer >= 1"),
    ("generations-zero", ["detect", "{txt}", "--out", "{tmp}/o.csv", "--generations", "0"],
     "argument --generations: expected an integer >= 1"),
    ("generations-huge", ["detect", "{txt}", "--out", "{tmp}/o.csv", "--generations", "2000000"],
     "argument --generations: expected an integer >= 1 and <= 1e+06"),
    ("seed-negative", ["generate", "a", "--out", "{tmp}/g", "--seed", "-1"],
     "argument --seed: expected an integer >= 0"),
    ("fpr-above-one", ["detect", "{txt}", "--out", "{tmp}/o.csv", "--fpr", "1.5"],
     "argument --fpr: expected a number > 0 and < 1, got '1.5'"),
    ("fpr-nan", ["detect", "{txt}", "--out", "{tmp}/o.csv", "--fpr", "nan"], "not a finite"),
    ("scored-steps-word", ["detect", "{txt}", "--out", "{tmp}/o.csv", "--steps", "some"],
     "argument --steps: steps must be a positive int, 'all', 'first:N' or 'last:N'"),
    ("scored-steps-zero", ["detect", "{txt}", "--out", "{tmp}/o.csv", "--steps", "0"],
     "argument --steps: steps must be >= 1"),
    ("preview-without-index", ["detect", "{txt}", "--out", "{tmp}/o.csv", "--detector",
                               "preview_replication"],
     "preview_replication needs the training set's index (--index IDX"),
    ("threshold-inf", ["eval", "replication", "{empty}", "--index", "{tmp}/i", "--out",
                       "{tmp}/r.json", "--threshold", "inf"], "argument --threshold"),
    ("top-k-zero", ["explain", "a cat", "--top-k", "0"], "argument --top-k: expected an integer"),
    ("seeds-zero", ["explain", "a cat", "--seeds", "0"], "argument --seeds: expected an integer"),
    ("explanation-fpr-zero", ["eval", "explanation", "--out", "{tmp}/e.json", "--fpr", "0"],
     "argument --fpr: expected a number > 0"),
    ("strengths-nan", ["eval", "mitigation", "--methods", "wen", "--out", "{tmp}/m.json",
                       "--strengths", "1,nan"], "--strengths must be finite numbers >= 0"),
    ("train-steps-negative", ["testbed", "train", "--out", "{tmp}/t", "--vae-steps", "-1"],
     "argument --vae-steps: expected an integer >= 0"),
    ("index-batch-zero", ["index", "build", "{empty}", "--out", "{tmp}/i", "--batch-size", "0"],
     "argument --batch-size"),
    ("index-lowpass-pixel", ["index", "build", "testbed", "--out", "{tmp}/i", "--lowpass", "32"],
     "--lowpass applies to SSCD indexes only"),
    ("out-xlsx", ["detect", "{txt}", "--out", "{tmp}/o.xlsx"],
     "unsupported output format '.xlsx'; use .csv, .jsonl, .parquet"),
    ("out-report-txt", ["eval", "detection", "--out", "{tmp}/r.txt"],
     "unsupported output format '.txt'; use .json"),
    ("out-is-a-folder", ["detect", "{txt}", "--out", "{empty}"], "is a folder; give a file name"),
    ("out-folder-is-a-file", ["generate", "a", "--out", "{file}"],
     "is an existing file, not a folder"),
    ("demo-out-is-a-file", ["demo", "--out", "{file}"], "is an existing file, not a folder"),
    ("out-under-a-file", ["detect", "{txt}", "--out", "{file}/sub/o.csv"],
     "is a file, not a folder"),
    ("empty-prompt-file", ["detect", "{emptytxt}", "--out", "{tmp}/o.csv"],
     "contains no prompts"),
    ("csv-without-prompt-column", ["detect", "{csv}", "--out", "{tmp}/o.csv"],
     "no string field 'prompt' or 'caption' (fields: id, text; choose one with --column)"),
    ("csv-wrong-column", ["detect", "{csv}", "--out", "{tmp}/o.csv", "--column", "prompt"],
     "no string field 'prompt'"),
    ("column-on-text-file", ["detect", "{txt}", "--out", "{tmp}/o.csv", "--column", "x"],
     "--column applies to tables"),
    ("missing-model", ["detect", "{txt}", "--out", "{tmp}/o.csv", "--model", "{tmp}/nope"],
     "does not exist"),
    ("unsupported-pipeline", ["detect", "{txt}", "--out", "{tmp}/o.csv", "--model", "{other}"],
     "unsupported pipeline class 'KandinskyPipeline'; diffmem supports StableDiffusionPipeline"),
    ("unknown-scheduler", ["generate", "a", "--out", "{tmp}/g", "--model", "{tiny}",
                           "--scheduler", "warp"], "unknown scheduler 'warp'"),
    ("unknown-detector", ["generate", "a", "--out", "{tmp}/g", "--detect", "magic"],
     "unknown detector 'magic'"),
    ("verify-non-testbed", ["testbed", "verify", "--out", "{tmp}/v.json", "--model", "{tiny}"],
     "needs a diffmem testbed model"),
    ("empty-replication-folder", ["eval", "replication", "{empty}", "--index", "{tmp}/i",
                                  "--out", "{tmp}/r.json"], "holds no images"),
    ("empty-index-source", ["index", "build", "{empty}", "--out", "{tmp}/i"],
     "holds no images to index"),
    ("empty-quality-folder", ["eval", "quality", "{empty}", "{empty}"],
     "holds no readable images"),
    ("calibrate-not-a-pipeline", ["calibrate", "--model", "{empty}"],
     "holds no diffusers pipeline"),
    ("calibrate-empty-clean", ["calibrate", "--model", "{tiny}", "--clean", "{emptytxt}"],
     "contains no prompts"),
    ("calibrate-fpr-zero", ["calibrate", "--model", "{tiny}", "--fpr", "0"],
     "argument --fpr: expected a number > 0 and < 1"),
    ("label-install-mitigated", ["testbed", "label", "--install", "--mitigate", "ren"],
     "drop --mitigate / --group"),
    ("index-and-no-index", ["explain", "a cat", "--index", "{tmp}/i", "--no-index"],
     "argument --no-index: not allowed with argument --index"),
    ("unknown-option", ["detect", "{txt}", "--out", "{tmp}/o.csv", "--sampling-stpes", "3"],
     "unrecognized arguments: --sampling-stpes 3"),
]


@pytest.fixture
def places(tmp_path, tiny_dir):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "p.txt").write_text("a red circle\n", encoding="utf-8")
    (tmp_path / "exists.txt").write_text("x", encoding="utf-8")
    (tmp_path / "none.txt").write_text("\n  \n", encoding="utf-8")
    (tmp_path / "t.csv").write_text("id,text\n1,a red circle\n", encoding="utf-8")
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    return {"tmp": scratch, "txt": tmp_path / "p.txt", "file": tmp_path / "exists.txt",
            "empty": tmp_path / "empty", "emptytxt": tmp_path / "none.txt",
            "csv": tmp_path / "t.csv", "tiny": tiny_dir, "other": other}


@pytest.mark.parametrize(("argv", "fragment"), [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, fragment, places, capsys):
    rc = main([a.format(**places) for a in argv])
    _, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and fragment in lines[0], lines[0]
    assert lines[0].startswith("diffmem")
    assert list(places["tmp"].iterdir()) == []  # nothing written
    assert list(places["empty"].iterdir()) == []


def test_docs_table_lists_every_bad_input():
    doc = (Path(__file__).parents[1] / "docs" / "cli.md").read_text(encoding="utf-8")
    for case_id, _, _ in BAD_INPUTS:
        assert f"`{case_id}`" in doc, case_id


def _walk(parser: argparse.ArgumentParser, name: str = "diffmem"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _walk(p, f"{name} {sub}")
        else:
            yield name, action


def test_every_option_has_help_and_help_shows_defaults(capsys):
    parser = build_parser()
    missing = [(cmd, a.option_strings or a.dest) for cmd, a in _walk(parser)
               if not a.help]
    assert missing == []
    assert main(["detect", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 7.5)" in text and "(default: testbed)" in text
    assert "(default: the detector's own, 50; 20 for preview_replication)" in text
    assert main(["generate", "--help"]) == 0
    assert "(default: 50)" in " ".join(capsys.readouterr().out.split())


def test_one_meaning_per_option_name():
    """--steps is the scored steps wherever it is shown; the schedule length is --sampling-steps;
    --model has one help text (or says it needs a testbed)."""
    from diffmem.cli.args import MODEL_HELP, TESTBED_MODEL_HELP

    for cmd, a in _walk(build_parser()):
        if "--steps" in a.option_strings and a.help != argparse.SUPPRESS:
            assert "scored" in a.help or "attributed" in a.help, cmd
        if "--sampling-steps" in a.option_strings:
            assert "schedule" in a.help, cmd
        if "--model" in a.option_strings:
            assert a.help in (MODEL_HELP, TESTBED_MODEL_HELP), cmd
            assert a.default == "testbed", cmd


def test_every_model_loading_command_takes_model():
    """The README's claim: every command that loads a model takes --model PATH."""
    takes = {cmd for cmd, a in _walk(build_parser()) if "--model" in a.option_strings}
    loading = {"diffmem demo", "diffmem generate", "diffmem detect", "diffmem explain",
               "diffmem testbed verify", "diffmem testbed prompts", "diffmem eval detection",
               "diffmem eval explanation", "diffmem eval mitigation"}
    assert loading <= takes


def test_old_spellings_still_work_with_a_note(capsys):
    parser = build_parser()
    a = parser.parse_args(["generate", "x", "--steps", "7"])
    assert a.sampling_steps == 7
    assert "--steps is deprecated here; use --sampling-steps" in capsys.readouterr().err
    a = parser.parse_args(["explain", "x", "--inference-steps", "9"])
    assert a.sampling_steps == 9 and a.steps == 1


def test_huge_runs_warn_but_run(capsys):
    a = build_parser().parse_args(["detect", "p.txt", "--out", "o.csv", "--generations", "500"])
    assert a.generations == 500
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("diffmem: warning: 500 is many generations")


def test_ctrl_c_says_nothing_was_kept(places, capsys, monkeypatch):
    import diffmem.detect.scan as scan

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(scan, "detect_file", interrupted)
    rc = main(["detect", str(places["txt"]), "--out", str(places["tmp"] / "o.csv")])
    err = capsys.readouterr().err
    assert rc == 130 and err == "diffmem: interrupted; nothing was written\n"


def test_ctrl_c_keeps_finished_images(places, capsys, monkeypatch):
    import diffmem.generate as gen

    real, calls = gen.sample, []

    def second_batch_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "sample", second_batch_interrupted)
    out = places["tmp"] / "g"
    rc = main(["generate", "a red circle", "a blue square", "--out", str(out), "--model",
               str(places["tiny"]), "--sampling-steps", "2", "--batch-size", "1"])
    err = capsys.readouterr().err
    assert rc == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"diffmem: interrupted; kept 1 of 2 images with their generations.jsonl lines in {out}")
    assert (out / "0000.png").is_file() and not (out / "0001.png").exists()
    rows = (out / "generations.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["prompt"] == "a red circle"


def test_generate_detect_scores_match_detect(places, capsys):
    """generate --detect with a short schedule scores with the detector's own settings (50 steps)
    on each image's noise: the same numbers as `detect --seed-mode per-prompt`."""
    prompts = ["a red circle", "the gargoyle origami poster"]
    out = places["tmp"] / "g"
    rc = main(["generate", *prompts, "--out", str(out), "--model", str(places["tiny"]),
               "--sampling-steps", "3", "--detect", "noise_magnitude", "--seed", "4"])
    err = capsys.readouterr().err
    assert rc == 0 and "is not the detector's (50 steps" in err
    rows = [json.loads(r) for r in (out / "generations.jsonl").read_text().splitlines()]
    f = places["tmp"] / "p.txt"
    f.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    assert main(["detect", str(f), "--out", str(places["tmp"] / "s.jsonl"), "--model",
                 str(places["tiny"]), "--detector", "noise_magnitude", "--seed", "4",
                 "--seed-mode", "per-prompt"]) == 0
    detected = [json.loads(r)["score"] for r in
                (places["tmp"] / "s.jsonl").read_text().splitlines()]
    assert [r["noise_magnitude"] for r in rows] == pytest.approx(detected, rel=1e-5)


def test_detect_output_has_truncated_column_and_one_warning(places, tmp_path):
    """In a fresh process, as a user runs it: the only stderr line is diffmem's truncation warning
    (no transformers message, no loading bars, no third-party warnings)."""
    f = tmp_path / "long.txt"
    f.write_text("a red circle\n" + "the gargoyle " + "word " * 100 + "\n", encoding="utf-8")
    out = tmp_path / "o.csv"
    env = {**os.environ, "DIFFMEM_PROGRESS": "0",
           "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-m", "diffmem.cli", "detect", str(f), "--out", str(out),
                           "--model", str(places["tiny"]), "--sampling-steps", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "diffmem: warning: 1 of 2 prompt(s) exceed the text encoder's 77 tokens; only their "
        "first tokens are scored (column 'truncated')"]
    rows = out.read_text().splitlines()
    assert rows[0] == "prompt,score,truncated"
    assert rows[1].endswith(",False") and rows[2].endswith(",True")


def test_one_progress_bar_per_long_job(places, capsys, monkeypatch):
    monkeypatch.setenv("DIFFMEM_PROGRESS", "1")
    out = places["tmp"] / "g"
    rc = main(["generate", "a", "b", "c", "--out", str(out), "--model", str(places["tiny"]),
               "--sampling-steps", "2", "--batch-size", "2", "--detect", "noise_magnitude",
               "--guidance-scale", "7.5"])
    err = capsys.readouterr().err
    assert rc == 0
    bars = {ln.split(":")[0] for ln in err.replace("\r", "\n").splitlines() if "%|" in ln}
    # the detector scoring apart (its own job) and the generation: one bar each, with rate and ETA
    assert bars == {"score (noise_magnitude)", "generate"}
    assert "img/s]" in err and "<" in err


def test_generate_warns_once_about_long_prompts(places, capsys, monkeypatch):
    monkeypatch.setenv("DIFFMEM_PROGRESS", "0")
    long = "the gargoyle " + "word " * 100
    out = places["tmp"] / "g"
    rc = main(["generate", long, "a red circle", long + "x", "--out", str(out), "--model",
               str(places["tiny"]), "--sampling-steps", "1", "--batch-size", "1"])
    err = capsys.readouterr().err
    assert rc == 0
    assert err.splitlines() == [
        "diffmem: warning: 2 of 3 prompt(s) exceed the text encoder's 77 tokens and were "
        "truncated (generations.jsonl: 'truncated')"]
    rows = [json.loads(r) for r in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["truncated"] for r in rows] == [True, False, True]


def test_ctrl_c_names_the_latest_count_once():
    from diffmem.runtime.interrupts import interrupted_message, kept, reset_kept

    reset_kept()
    for n in (1, 2, 3, 4):
        kept(f"{n} of 4 images in out", key="generate:out")
    assert interrupted_message() == "diffmem: interrupted; kept 4 of 4 images in out"
    reset_kept()


def test_console_entry_flushes_and_exits_with_the_code(places, tmp_path):
    """`python -m diffmem.cli` ends the process at once (no interpreter teardown) with main's exit
    code and everything written: stdout, stderr and the output file."""
    out = tmp_path / "s.csv"
    env = {**os.environ, "DIFFMEM_PROGRESS": "0",
           "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    ok = subprocess.run([sys.executable, "-m", "diffmem.cli", "detect", str(places["txt"]),
                         "--out", str(out), "--model", str(places["tiny"]),
                         "--sampling-steps", "2"], capture_output=True, text=True, env=env,
                        timeout=300)
    assert ok.returncode == 0 and json.loads(ok.stdout)["n_prompts"] == 1
    assert out.read_text().splitlines()[0] == "prompt,score,truncated"
    bad = subprocess.run([sys.executable, "-m", "diffmem.cli", "generate", "x",
                          "--guidance-scale", "nan"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stdout == ""


def test_parsing_imports_no_torch():
    """Parsing (and so --help and a bad option) runs without torch: each command's parser module
    is loaded without its package (diffmem.cli._load_extension) and reads defaults from torch-free
    modules (diffmem.runtime.defaults, diffmem.train.config)."""
    code = ("import sys; from diffmem.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert out.stdout.strip() == "[]", out.stdout


def test_silent_progress_hides_bars_inside(monkeypatch):
    from diffmem.runtime.progress import _Silent, progress, silent_progress

    monkeypatch.setenv("DIFFMEM_PROGRESS", "1")
    with progress(3, "outer") as bar:
        assert not isinstance(bar, _Silent)
    with silent_progress(), progress(3, "inside") as bar:
        assert isinstance(bar, _Silent)

"""``diffmem calibrate --index``: the training index stored with the calibration (checked against
the model first), then used by explain, detect, scan, generate --mitigate auto and serve without
--index, each saying so in one line; --no-index turns it off; a stored folder that is gone is one
line naming `diffmem calibrate --index`, exit 2."""

from __future__ import annotations

import json
import shutil

import pytest

from diffmem.cli import main

PROMPT = "the zanzibar quixotic poster"
NOTE = "diffmem: using the training index stored by `diffmem calibrate --index`"


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def cache(calibration_cache):
    return calibration_cache


@pytest.fixture
def stored(tiny_testbed, tiny_testbed_index, cache, tmp_path):
    """A copy of the tiny testbed's index, stored for its weights (as `calibrate --index` does,
    without fitting thresholds); returns the copy's folder."""
    from diffmem.models.adapter import load_adapter
    from diffmem.models.calibration import CalibrationStore, weights_fingerprint

    folder = tmp_path / "idx"
    shutil.copytree(tiny_testbed_index, folder)
    CalibrationStore().put_index(weights_fingerprint(load_adapter(tiny_testbed)), folder)
    return folder


def test_calibrate_index_then_explain_detect_scan_use_it(tiny_testbed, tiny_testbed_index,
                                                         tiny_dir, cache, tmp_path, capsys):
    # another model's index: one line, exit 2, nothing stored
    rc, out, err = run(capsys, "calibrate", "--model", tiny_dir, "--index", tiny_testbed_index)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("diffmem: error: calibrate --index")
    assert not cache.exists()

    rc, out, err = run(capsys, "calibrate", "--model", tiny_testbed, "--index",
                       tiny_testbed_index)
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["index"]["path"] == str(tiny_testbed_index.resolve())
    assert (cache / "indexes").is_dir() and summary["index"]["stored"].startswith(str(cache))

    rc, out, err = run(capsys, "explain", PROMPT, "--model", tiny_testbed, "--sampling-steps", 3)
    assert rc == 0, err
    assert err.count(NOTE) == 1 and str(tiny_testbed_index.resolve()) in err
    assert "verdict by generation (4 previews of 20 steps" in out

    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{PROMPT}\na red circle\n", encoding="utf-8")
    rc, out, err = run(capsys, "detect", prompts, "--out", tmp_path / "d.csv", "--model",
                       tiny_testbed, "--generations", 1, "--sampling-steps", 3)
    assert rc == 0, err
    detected = json.loads(out)
    assert detected["detector"] == "preview_replication" and err.count(NOTE) == 1
    assert detected["index"]["origin"] == "stored"

    rc, out, err = run(capsys, "scan", prompts, "--out", tmp_path / "scan", "--model",
                       tiny_testbed, "--preview-generations", 1, "--preview-steps", 3,
                       "--sampling-steps", 3, "--no-progress")
    assert rc == 0, err
    verdict = json.loads(out)["verdict"]
    assert err.count(NOTE) == 1
    assert verdict["source"] == "generation" and verdict["index_origin"] == "stored"

    # --no-index: the first-step estimate, no note
    rc, out, err = run(capsys, "explain", PROMPT, "--model", tiny_testbed, "--sampling-steps", 3,
                       "--no-index")
    assert rc == 0 and NOTE not in err and "first-step estimate only" in out
    rc, out, err = run(capsys, "scan", prompts, "--out", tmp_path / "scan2", "--model",
                       tiny_testbed, "--sampling-steps", 3, "--no-progress", "--no-index")
    assert rc == 0 and NOTE not in err and json.loads(out)["verdict"]["source"] == "estimate"
    # --index and --no-index exclude each other
    rc, _, err = run(capsys, "explain", PROMPT, "--index", tiny_testbed_index, "--no-index")
    assert rc == 2 and "not allowed with argument" in err


def test_a_stored_index_that_is_gone_is_one_line(tiny_testbed, stored, tmp_path, capsys):
    shutil.rmtree(stored)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n", encoding="utf-8")
    for argv in (["explain", PROMPT, "--model", tiny_testbed],
                 ["scan", prompts, "--out", tmp_path / "s", "--model", tiny_testbed],
                 ["detect", prompts, "--out", tmp_path / "d.csv", "--model", tiny_testbed]):
        rc, _, err = run(capsys, *argv)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert "no longer exists" in lines[0] and "`diffmem calibrate --model MODEL --index DIR`" \
            in lines[0]
    assert not (tmp_path / "s").exists() and not (tmp_path / "d.csv").exists()
    # --no-index still runs
    rc, _, err = run(capsys, "explain", PROMPT, "--model", tiny_testbed, "--sampling-steps", 3,
                     "--no-index")
    assert rc == 0, err


def test_generate_auto_and_serve_use_the_stored_index(tiny_testbed, stored, tmp_path, capsys,
                                                      monkeypatch):
    import uvicorn

    import diffmem.server

    rc, out, err = run(capsys, "generate", PROMPT, "--model", tiny_testbed, "--mitigate", "auto",
                       "--sampling-steps", 2, "--threshold", 1e9, "--out", tmp_path / "g")
    assert rc == 0 and "guard verdicts" in out, err
    assert err.count(NOTE) == 1 and str(stored.resolve()) in err
    # a plain generation uses no index: nothing said
    rc, _, err = run(capsys, "generate", PROMPT, "--model", tiny_testbed, "--sampling-steps", 2,
                     "--out", tmp_path / "plain")
    assert rc == 0 and NOTE not in err

    built = {}
    real_build = diffmem.server.build_engine

    def build(model, **kw):
        built["engine"] = engine = real_build(model, **kw)
        return engine

    monkeypatch.setattr(diffmem.server, "build_engine", build)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    rc, _, err = run(capsys, "serve", "--model", tiny_testbed, "--threshold", 0.5)
    assert rc == 0, err
    assert err.count(NOTE) == 1 and "(stored by `diffmem calibrate --index`)" in err
    assert built["engine"].judge is not None
    rc, _, err = run(capsys, "serve", "--model", tiny_testbed, "--threshold", 0.5, "--no-index")
    assert rc == 0 and NOTE not in err and built["engine"].judge is None
    assert "index: none (--no-index)" in err

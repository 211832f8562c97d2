"""`diffmem calibrate`: thresholds stored once per model's weights and found by every command
without --threshold; never applied to other weights; bad input is one line and stores nothing."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from diffmem.cli import main

CLEAN = ["a red circle on a gray background", "a blue square on white", "a small green cross",
         "two yellow dots on black", "a gray sky over a flat field"]


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def cache(calibration_cache):
    return calibration_cache


@pytest.fixture
def clean_file(tmp_path):
    path = tmp_path / "clean.txt"
    path.write_text("\n".join(CLEAN) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def other_weights(tiny_dir, tmp_path_factory):
    """The tiny pipeline with its UNet's weights changed: another model."""
    import torch

    from diffmem.models.adapter import load_adapter

    folder = tmp_path_factory.mktemp("other") / "pipe"
    shutil.copytree(tiny_dir, folder)
    pipe = load_adapter(folder).pipe
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.mul_(1.01)
    pipe.unet.save_pretrained(folder / "unet")
    return folder


def test_generate_auto_names_calibrate_then_uses_the_stored_calibration(tiny_dir, clean_file,
                                                                       cache, tmp_path, capsys):
    gen = ["generate", "a cat", "--model", tiny_dir, "--mitigate", "auto", "--sampling-steps", 2]
    rc, out, err = run(capsys, *gen, "--out", tmp_path / "before")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err
    assert f"run `diffmem calibrate --model {tiny_dir}` once" in lines[0]
    assert not (tmp_path / "before").exists() and not cache.exists()

    rc, out, err = run(capsys, "calibrate", "--model", tiny_dir, "--clean", clean_file)
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["n_clean"] == len(CLEAN) and summary["fingerprint"].startswith("weights:")
    thr = summary["thresholds"]
    assert set(thr) == {"first_step", "watch", "sharpness"} and thr["first_step"] == thr["watch"]
    assert sorted(summary["stored"]) == sorted(str(p) for p in cache.glob("*.json"))
    assert len(summary["stored"]) == 2

    rc, out, err = run(capsys, *gen, "--out", tmp_path / "after")
    assert rc == 0, err
    row = json.loads((tmp_path / "after" / "generations.jsonl").read_text().splitlines()[0])
    assert row["verdict"]["status"] in ("clean", "mitigated")  # auto is the guard

    # detect with the default detector's settings: a 'flagged' column from the stored threshold
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n", encoding="utf-8")
    rc, out, err = run(capsys, "detect", prompts, "--out", tmp_path / "d.csv", "--model", tiny_dir)
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["calibration"] == "stored" and summary["threshold"] == thr["sharpness"]
    with open(tmp_path / "d.csv", newline="") as f:
        assert "flagged" in next(csv.reader(f))
    # other settings than the calibrated ones: no threshold, as before
    rc, out, _ = run(capsys, "detect", prompts, "--out", tmp_path / "e.csv", "--model", tiny_dir,
                     "--sampling-steps", 2)
    assert rc == 0 and "threshold" not in json.loads(out)


def test_every_path_finds_the_calibration_at_any_fpr(tiny_dir, clean_file, cache):
    from diffmem.detect import NoiseMagnitude
    from diffmem.detect.calibration import calibrate_model, calibrated_threshold
    from diffmem.mitigate.registry import default_threshold
    from diffmem.models.adapter import load_adapter

    adapter = load_adapter(tiny_dir)
    cals = calibrate_model(adapter, CLEAN, fpr=0.2)
    first = next(c for c in cals if c.detector == "noise_magnitude")
    assert first.fpr == 0.2 and first.extra["clean"] == "given"
    assert default_threshold(adapter) == first.threshold  # generate, serve, the guard
    det = NoiseMagnitude(steps=1, generations=1)
    assert calibrated_threshold(adapter, det) == first.threshold  # explain, scan
    assert calibrated_threshold(adapter, NoiseMagnitude(steps=2, generations=1)) is None


def test_calibration_is_never_applied_to_other_weights(tiny_dir, other_weights, clean_file, cache,
                                                       tmp_path, capsys):
    from diffmem.detect import NoiseMagnitude
    from diffmem.detect.calibration import calibrated_threshold
    from diffmem.models.adapter import load_adapter
    from diffmem.models.calibration import Calibration, check_calibration, weights_fingerprint
    from diffmem.runtime.errors import ConfigError

    assert run(capsys, "calibrate", "--model", tiny_dir, "--clean", clean_file)[0] == 0
    # a copy of the stored file under another name is still the first model's calibration
    for path in list(cache.glob("*.json")):
        shutil.copy(path, path.with_name("copied-" + path.name))
    other = load_adapter(other_weights)
    fp_other = weights_fingerprint(other)
    assert fp_other != weights_fingerprint(load_adapter(tiny_dir))
    assert calibrated_threshold(other, NoiseMagnitude(steps=1, generations=1)) is None
    rc, _, err = run(capsys, "generate", "a cat", "--model", other_weights, "--mitigate", "auto",
                     "--sampling-steps", 2, "--out", tmp_path / "g")
    assert rc == 2 and "diffmem calibrate" in err and not (tmp_path / "g").exists()
    stored = Calibration(**json.loads(next(cache.glob("copied-*.json")).read_text()))
    with pytest.raises(ConfigError, match="made for other weights"):
        check_calibration(stored, fp_other)


@pytest.mark.parametrize("case", ["not-a-pipeline", "empty-clean", "missing-clean"])
def test_calibrate_bad_input_is_one_line_and_stores_nothing(case, tiny_dir, cache, tmp_path,
                                                            capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    (tmp_path / "blank.txt").write_text("\n \n", encoding="utf-8")
    argv = {"not-a-pipeline": ["--model", folder],
            "empty-clean": ["--model", tiny_dir, "--clean", tmp_path / "blank.txt"],
            "missing-clean": ["--model", tiny_dir, "--clean", tmp_path / "nope.txt"]}[case]
    rc, out, err = run(capsys, "calibrate", *argv)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("diffmem: error:"), err
    assert out == "" and not cache.exists() and list(folder.iterdir()) == []


def test_calibrate_without_clean_uses_the_profile_then_the_shipped_prompts(tiny_testbed, cache):
    from diffmem.detect.calibration import calibrate_model, shipped_clean_prompts
    from diffmem.models.adapter import load_adapter

    adapter = load_adapter(tiny_testbed)
    [nm, _] = calibrate_model(adapter)
    assert nm.extra["clean"] == "profile" and nm.n_clean == len(adapter.profile.clean_prompts)
    shipped = shipped_clean_prompts()
    assert 150 <= len(shipped) <= 250 and len(set(shipped)) == len(shipped)


def test_shipped_clean_prompts_are_package_data():
    import tomllib

    root = Path(__file__).parents[2]
    data = tomllib.loads((root / "pyproject.toml").read_text())
    assert "detect/clean_prompts.txt" in data["tool"]["setuptools"]["package-data"]["diffmem"]
    assert (root / "src/diffmem/detect/clean_prompts.txt").is_file()

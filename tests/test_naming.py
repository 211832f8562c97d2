"""Registry names: hyphen and underscore spellings (any case) name the same entry everywhere."""

from __future__ import annotations

import json

import pytest

from diffmem.cli import main
from diffmem.detect import AttentionEntropy, NoiseMagnitude, make_detector
from diffmem.models.adapter import load_adapter
from diffmem.runtime.errors import ConfigError
from diffmem.runtime.naming import lookup, registry_name


def test_registry_name_and_lookup():
    assert registry_name("noise-magnitude") == registry_name("Noise_Magnitude ") == \
        "noise_magnitude"
    assert lookup({"euler_a": 1}, "EULER-A", "scheduler") == 1
    with pytest.raises(ConfigError, match=r"unknown scheduler 'warp'; choose one of: euler_a"):
        lookup({"euler_a": 1}, "warp", "scheduler")


@pytest.mark.parametrize("name", ["noise-magnitude", "noise_magnitude", "Noise-Magnitude"])
def test_detector_spellings(name):
    assert isinstance(make_detector(name, steps=2), NoiseMagnitude)


def test_late_entropy_spelling_keeps_its_mode():
    det = make_detector("attention-entropy-late")
    assert isinstance(det, AttentionEntropy) and det.name == "attention_entropy_late"
    with pytest.raises(ConfigError, match="unknown detector 'noise magnitude'"):
        make_detector("noise magnitude")


@pytest.mark.parametrize(("name", "cls"), [("euler-a", "EulerAncestralDiscreteScheduler"),
                                           ("Euler_A", "EulerAncestralDiscreteScheduler"),
                                           ("UniPC", "UniPCMultistepScheduler"),
                                           ("DDIMScheduler", "DDIMScheduler")])
def test_scheduler_spellings(tiny_pipe, name, cls):
    assert type(load_adapter(tiny_pipe, scheduler=name).scheduler).__name__ == cls


def test_cli_accepts_hyphenated_names(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\nthe narwhal zanzibar poster\n", encoding="utf-8")
    rc = main(["detect", str(prompts), "--out", str(tmp_path / "s.csv"), "--model", str(tiny_dir),
               "--detector", "noise-magnitude", "--sampling-steps", "3", "--scheduler", "euler-a"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out)["detector"] == "noise_magnitude"
    gen = tmp_path / "gen"
    rc = main(["generate", "a red circle", "--out", str(gen), "--model", str(tiny_dir),
               "--sampling-steps", "2", "--detect", "noise-magnitude", "--scheduler", "Euler-A"])
    assert rc == 0, capsys.readouterr().err
    row = json.loads((gen / "generations.jsonl").read_text().splitlines()[0])
    assert row["noise_magnitude"] > 0

"""Folder-level alignment and quality reports and their command-line parsing."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffmem.cli import eval as cli
from diffmem.eval.probe import PAIRS, AttributeProbe, ProbeConfig, save_probe
from diffmem.eval.quality import frechet_distance
from diffmem.eval.reports import eval_alignment, eval_quality, read_captioned_images
from diffmem.runtime.errors import ConfigError


def _constant_probe(tmp_path):
    probe = AttributeProbe(ProbeConfig(width=4))
    with torch.no_grad():
        probe.head.weight.zero_()
        probe.head.bias.copy_(torch.arange(len(PAIRS)) / 10 - 2)
    return save_probe(probe, tmp_path / "probe")


def _write_folder(root, captions, size=64, seed=0):
    root.mkdir()
    rng = np.random.default_rng(seed)
    for i, cap in enumerate(captions):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(cap)
    return root


def test_alignment_report_of_a_caption_folder(tmp_path):
    folder = _write_folder(tmp_path / "imgs", ["a red circle", "zanzibar poster", "a blue square"])
    out = tmp_path / "report.json"
    report = eval_alignment(folder, out, probe=_constant_probe(tmp_path))
    p = torch.sigmoid(torch.arange(len(PAIRS)) / 10 - 2)
    want = [float(p[PAIRS.index(("red", "circle"))]), float(p[PAIRS.index(("blue", "square"))])]
    assert report["attribute_scored"] == 2 and report["attribute_unscored"] == 1
    assert report["attribute_alignment"] == pytest.approx(sum(want) / 2, rel=1e-5)
    assert report["per_image"][1]["attribute_alignment"] is None
    assert json.loads(out.read_text())["images"] == 3
    with pytest.raises(ConfigError, match="nothing to measure"):
        eval_alignment(folder, attributes=False)


def test_generations_folder_is_read_through_its_listing(tmp_path):
    folder = _write_folder(tmp_path / "gen", ["ignored", "ignored"])
    rows = [{"prompt": "a green cross", "file": "1.png"}, {"prompt": "a white diamond", "file": "0.png"}]
    (folder / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    images, captions, names = read_captioned_images(folder)
    assert captions == ["a green cross", "a white diamond"] and names == ["1.png", "0.png"]
    assert images[0].shape == (3, 64, 64) and images[0].min() >= -1


def test_quality_report_with_probe_features(tmp_path, monkeypatch):
    real = _write_folder(tmp_path / "real", ["x"] * 4, seed=1)
    gen = _write_folder(tmp_path / "gen", ["x"] * 3, size=48, seed=2)
    probe_path = _constant_probe(tmp_path)
    from diffmem.eval import probe as probe_mod
    from diffmem.eval.quality import ProbeFeatures

    monkeypatch.setattr(probe_mod, "default_probe", lambda: probe_mod.load_probe(probe_path))
    report = eval_quality(real, gen, features="probe")
    extract = ProbeFeatures(probe_path)
    want = frechet_distance(extract(torch.stack(read_captioned_images(real)[0])),
                            extract(torch.stack(read_captioned_images(gen)[0])))
    assert report["metric"] == "fpd" and report["n_real"] == 4 and report["n_generated"] == 3
    assert report["value"] == pytest.approx(want, rel=1e-6) and not math.isnan(report["value"])
    with pytest.raises(ConfigError, match="needs --inception"):
        eval_quality(real, gen, features="inception")


def test_cli_registers_the_commands():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    ev = sub.add_parser("eval").add_subparsers(dest="eval_command")
    cli.register(sub, ev)
    a = parser.parse_args(["eval", "quality", "testbed", "gen", "--features", "probe"])
    assert a.func is cli._cmd_quality and a.real == "testbed" and a.features == "probe"
    a = parser.parse_args(["eval", "alignment", "gen", "--clip", "clipdir"])
    assert a.func is cli._cmd_alignment and a.clip == "clipdir" and not a.no_attributes
    a = parser.parse_args(["eval", "probe-train", "--out", "p", "--train-steps", "3"])
    assert a.func is cli._cmd_probe_train and a.steps == 3

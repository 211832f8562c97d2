"""``diffmem scan --index``: the decision is the verdict by generation (GenerationJudge), the
detector's score the estimate, each row saying which decided; the index is part of the scan's
identity; another model's index is one line, exit 2, nothing written."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from diffmem.detect.verdict import GenerationJudge
from diffmem.scale.scan import ScanConfig, scan

from .test_scan import SAMPLING, read_scan, run_cli, write_prompts

PREVIEW = {"preview_generations": 1, "preview_steps": 3}


def test_scan_with_an_index_decides_by_generation(tiny_testbed, tiny_testbed_index, tmp_path):
    prompts = write_prompts(tmp_path / "p.txt", 3)
    out = tmp_path / "scan"
    # every estimate flags (threshold far below any score); the previews of this untrained model
    # copy nothing: the decision must be the generation verdict, not the estimate
    cfg = ScanConfig(model=tiny_testbed, index=tiny_testbed_index, threshold=-1e9,
                     num_inference_steps=SAMPLING, shard_size=2, **PREVIEW)
    s = scan(prompts, out, cfg)
    rows = read_scan(out)
    judge = GenerationJudge(tiny_testbed_index, generations=1, num_inference_steps=3)
    verdicts = judge(str(tiny_testbed), prompts.read_text().splitlines(), evidence=False)
    assert rows["decision"] == [v.copies for v in verdicts]
    assert rows["verdict_source"] == ["generation"] * 3
    assert rows["estimate"] == [True] * 3 and rows["decision"] != rows["estimate"]
    for row, v in zip(rows["verdict"], verdicts, strict=True):
        d = json.loads(row)
        assert d["margin"] == pytest.approx(v.margin, abs=1e-6)
        assert d["criterion"] == "tiled_l2" and d["nearest_id"] == v.nearest_id
    assert s["verdict"]["source"] == "generation" and s["verdict"]["index_origin"] == "given"
    assert "1 previews of 3 steps" in s["verdict"]["method"]
    per = s["detectors"]["noise_magnitude"]
    assert per["n_flagged"] == sum(rows["decision"]) and per["n_estimate_flagged"] == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["identity"]["index"]["index"] == str(tiny_testbed_index.resolve())

    # resumed with the same index: nothing redone; without it or with another: refused
    assert scan(prompts, out, cfg)["resumed_shards"] == 2
    other = tmp_path / "idx_copy"
    shutil.copytree(tiny_testbed_index, other)
    for changed in (dataclasses.replace(cfg, index=None),
                    dataclasses.replace(cfg, index=other),
                    dataclasses.replace(cfg, preview_generations=2)):
        with pytest.raises(Exception, match="another training index or verdict setting"):
            scan(prompts, out, changed)


def test_scan_without_an_index_says_the_decision_is_an_estimate(tiny_testbed, tmp_path):
    prompts = write_prompts(tmp_path / "p.txt", 2)
    s = scan(prompts, tmp_path / "scan", ScanConfig(model=tiny_testbed, threshold=0.5,
                                                     num_inference_steps=SAMPLING))
    rows = read_scan(tmp_path / "scan")
    assert rows["verdict_source"] == ["estimate"] * 2 and rows["verdict"] == [None] * 2
    assert rows["decision"] == rows["estimate"]
    assert s["verdict"]["source"] == "estimate" and "--index IDX" in s["verdict"]["note"]


def test_scan_another_models_index_is_one_line_exit_2_nothing_written(tiny_dir, tiny_testbed,
                                                                     tiny_testbed_index,
                                                                     tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.txt", 2)
    rc, out, err = run_cli(capsys, "scan", prompts, "--out", tmp_path / "s", "--model", tiny_dir,
                           "--index", tiny_testbed_index, "--threshold", 0.5,
                           "--sampling-steps", SAMPLING, "--no-progress")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("diffmem: error: scan --index: ")
    assert not (tmp_path / "s").exists() and out == ""
    # the CLI with this model's index: generation verdicts, the source in every row
    rc, out, err = run_cli(capsys, "scan", prompts, "--out", tmp_path / "ok", "--model",
                           tiny_testbed, "--index", tiny_testbed_index, "--preview-steps", 3,
                           "--preview-generations", 1, "--sampling-steps", SAMPLING,
                           "--no-progress")
    assert rc == 0, err
    assert json.loads(out)["verdict"]["source"] == "generation"
    assert set(read_scan(tmp_path / "ok")["verdict_source"]) == {"generation"}

"""``diffmem scan`` on the local engine: output shards and manifest, resume after a kill (nothing
lost or written twice), summary, explanations, and one-line errors (exit 2) for bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import diffmem
from diffmem.cli import main
from diffmem.detect.registry import make_detector
from diffmem.scale.scan import ScanConfig, scan

SAMPLING = 3  # denoising schedule length: scores only need step 0; a short schedule is cheaper


def write_prompts(path: Path, n: int) -> Path:
    words = ["red", "cat", "poster", "gargoyle", "origami", "sofa", "narwhal", "blue"]
    path.write_text("".join(f"a {words[i % 8]} {words[(i * 3) % 8]} number {i}\n"
                            for i in range(n)), encoding="utf-8")
    return path


def read_scan(out: Path):
    tables = [pq.read_table(p).to_pydict() for p in sorted(out.glob("shard-*.parquet"))]
    return {k: [x for t in tables for x in t[k]] for k in tables[0]}


def test_scan_writes_shards_manifest_summary(tiny_dir, tmp_path):
    prompts = write_prompts(tmp_path / "p.txt", 7)
    out = tmp_path / "scan"
    cfg = ScanConfig(model=tiny_dir, detectors=["noise_magnitude", "attention_entropy"],
                     shard_size=3, num_inference_steps=SAMPLING, threshold_from=prompts, fpr=0.2)
    s = scan(prompts, out, cfg)
    assert sorted(p.name for p in out.glob("shard-*")) == [f"shard-00000{i}.parquet"
                                                            for i in range(3)]
    rows = read_scan(out)
    assert len(rows["score"]) == 14
    text = prompts.read_text().splitlines()
    for det in ("noise_magnitude", "attention_entropy"):
        sel = [i for i, d in enumerate(rows["detector"]) if d == det]
        assert [rows["prompt"][i] for i in sel] == text
        assert [rows["prompt_id"][i] for i in sel] == [str(i) for i in range(7)]
        # the shard boundaries do not change the scores: same as scoring all prompts at once
        ref = make_detector(det, num_inference_steps=SAMPLING).score(str(tiny_dir), text)
        np.testing.assert_allclose([rows["score"][i] for i in sel], ref, rtol=1e-5)
        thr = rows["threshold"][sel[0]]
        assert [rows["decision"][i] for i in sel] == [rows["score"][i] > thr for i in sel]
        settings = json.loads(rows["settings"][sel[0]])
        assert settings["detector"] == det and settings["num_inference_steps"] == SAMPLING
        per = s["detectors"][det]
        assert per["n_prompts"] == 7 and 0 < per["n_flagged"] < 7
        assert per["flagged_share"] == pytest.approx(per["n_flagged"] / 7)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_prompts"] == 7 and manifest["n_shards"] == 3
    assert (out / "scores.png").stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["scored_shards"] == 3

    # a rerun finds every shard done and rewrites none
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    s2 = scan(prompts, out, cfg)
    assert s2["scored_shards"] == 0 and s2["resumed_shards"] == 3
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == before


def test_explain_flagged_prompts(tiny_dir, tmp_path):
    prompts = write_prompts(tmp_path / "p.txt", 4)
    ref = make_detector("noise_magnitude", num_inference_steps=SAMPLING).score(
        str(tiny_dir), prompts.read_text().splitlines())
    thr = float(np.median(ref))
    scan(prompts, tmp_path / "scan", ScanConfig(model=tiny_dir, threshold=thr, explain=True,
                                                num_inference_steps=SAMPLING, shard_size=4))
    rows = read_scan(tmp_path / "scan")
    for flagged, expl in zip(rows["decision"], rows["explanation"], strict=True):
        if flagged:
            top = json.loads(expl)["top_words"]
            assert 1 <= len(top) <= 3 and all(isinstance(w, str) for w, _ in top)
        else:
            assert expl is None
    assert any(rows["decision"]) and not all(rows["decision"])


def test_resume_after_kill_loses_and_duplicates_nothing(tiny_dir, tmp_path):
    """A scan killed (SIGKILL) after its first shard, then rerun: every prompt once, the shards
    written before the kill kept as they were, scores equal to an uninterrupted scan."""
    n, size = 60, 2
    prompts = write_prompts(tmp_path / "p.txt", n)
    out = tmp_path / "scan"
    args = [sys.executable, "-m", "diffmem.cli", "scan", str(prompts), "--out", str(out),
            "--model", str(tiny_dir), "--sampling-steps", str(SAMPLING), "--shard-size",
            str(size), "--threshold", "0.5", "--no-progress", "--batch-size", "1"]
    env = {**os.environ, "PYTHONPATH": str(Path(diffmem.__file__).parents[1]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (out / "shard-000000.parquet").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no shard written in 120 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*")}
    assert 1 <= len(kept) < n // size, "the kill came too late to test resuming"
    cfg = ScanConfig(model=tiny_dir, num_inference_steps=SAMPLING, shard_size=size,
                     threshold=0.5, batch_size=1)
    s = scan(prompts, out, cfg)
    assert s["resumed_shards"] == len(kept) and s["scored_shards"] == n // size - len(kept)
    assert {k: (p.stat().st_ino, p.stat().st_mtime_ns) for k in kept
            for p in [out / k]} == kept
    assert not list(out.glob(".*.tmp"))
    rows = read_scan(out)
    assert rows["prompt_id"] == [str(i) for i in range(n)]
    fresh = tmp_path / "fresh"
    scan(prompts, fresh, cfg)
    assert read_scan(fresh)["score"] == rows["score"]


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_bad_input_one_line_exit_2(tiny_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.txt", 3)
    common = ["--model", tiny_dir, "--sampling-steps", SAMPLING, "--no-progress"]
    rc, out, _ = run_cli(capsys, "scan", prompts, "--out", tmp_path / "s", "--threshold", 0.5,
                         *common)
    assert rc == 0 and json.loads(out)["n_prompts"] == 3

    def fails(*argv, match):
        rc, _, err = run_cli(capsys, "scan", *argv, *common)
        [line] = [ln for ln in err.splitlines() if "error" in ln]  # (tqdm may print too)
        assert rc == 2 and line.startswith("diffmem: error: ") and match in line, err

    # another scan's manifest: another detector, another model, other settings
    fails(prompts, "--out", tmp_path / "s", "--detector", "attention_entropy", "--threshold",
          0.5, match="another scan's manifest (another detector")
    fails(prompts, "--out", tmp_path / "s", "--threshold", 0.5, "--guidance-scale", 3,
          match="another detector or detector settings")
    fails(prompts, "--out", tmp_path / "s", "--threshold", 0.7, match="another threshold")
    other = tmp_path / "other_model"
    import shutil

    shutil.copytree(tiny_dir, other)
    cfg = other / "unet" / "config.json"
    cfg.write_text(cfg.read_text().replace("{", '{"_note": "changed",', 1))
    rc, _, err = run_cli(capsys, "scan", prompts, "--out", tmp_path / "s", "--threshold", 0.5,
                         "--model", other, "--sampling-steps", SAMPLING, "--no-progress")
    assert rc == 2 and "another model" in err
    # bad prompt inputs
    (tmp_path / "empty.txt").write_text("\n")
    fails(tmp_path / "empty.txt", "--out", tmp_path / "e", match="contains no prompts")
    (tmp_path / "bad.parquet").write_bytes(b"nope")
    fails(tmp_path / "bad.parquet", "--out", tmp_path / "e", match="as Parquet")
    fails(prompts.with_suffix(".jsonl"), "--out", tmp_path / "e", match="does not exist")
    (tmp_path / "p.jsonl").write_text('{"caption": "x"}\n')
    fails(tmp_path / "p.jsonl", "--out", tmp_path / "e", "--prompt-column", "text",
          match="no prompt column 'text'")
    fails(prompts, "--out", tmp_path / "e", "--explain", match="--explain needs a decision")
    # a bad line deep in a file is found by the worker that reads it: same one-line error
    lines = [json.dumps({"prompt": f"p{i}"}) for i in range(5)]
    lines[3] = "{not json"
    (tmp_path / "late.jsonl").write_text("\n".join(lines))
    fails(tmp_path / "late.jsonl", "--out", tmp_path / "late", "--threshold", 0.5,
          "--shard-size", 2, match="late.jsonl:4: not valid JSON")
    assert (tmp_path / "late" / "shard-000000.parquet").exists()  # the shard before it is kept

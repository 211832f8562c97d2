"""The Ray engine on a small local Ray cluster started by the test (2 CPUs, 100 MB object store,
no dashboard): same scores as the local engine, a killed worker's shard redone once, and an index
built on Ray equal to the local build."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'diffmem[ray]')")

from diffmem.scale import ray_engine  # noqa: E402
from diffmem.scale.scan import ScanConfig, scan  # noqa: E402

from .crashing import crashing_scan_actor  # noqa: E402
from .test_scan import SAMPLING, read_scan, write_prompts  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 * 1024,
             log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_scan_equals_local(ray_cluster, tiny_dir, tmp_path):
    prompts = write_prompts(tmp_path / "p.txt", 6)
    cfg = ScanConfig(model=tiny_dir, detectors=["noise_magnitude", "attention_entropy"],
                     shard_size=2, num_inference_steps=SAMPLING, threshold_from=prompts,
                     fpr=0.3, batch_size=2)
    scan(prompts, tmp_path / "local", cfg)
    s = scan(prompts, tmp_path / "ray", dataclasses.replace(cfg, engine="ray", workers=2))
    assert s["engine"] == "ray" and s["scored_shards"] == 3
    local, remote = read_scan(tmp_path / "local"), read_scan(tmp_path / "ray")
    assert remote == local  # every column, scores bit for bit
    assert any(local["decision"]) and not all(local["decision"])


def test_ray_scan_with_an_index_equals_local(ray_cluster, tiny_testbed, tiny_testbed_index,
                                             tmp_path):
    """The index reaches the actors (the job carries it): the same generation verdicts."""
    prompts = write_prompts(tmp_path / "p.txt", 4)
    cfg = ScanConfig(model=tiny_testbed, index=tiny_testbed_index, threshold=0.5, shard_size=2,
                     num_inference_steps=SAMPLING, preview_generations=1, preview_steps=3)
    scan(prompts, tmp_path / "local", cfg)
    s = scan(prompts, tmp_path / "ray", dataclasses.replace(cfg, engine="ray", workers=2))
    assert s["verdict"]["source"] == "generation" and s["scored_shards"] == 2
    local, remote = read_scan(tmp_path / "local"), read_scan(tmp_path / "ray")
    assert remote == local and set(local["verdict_source"]) == {"generation"}


@pytest.mark.slow
def test_ray_worker_killed_shard_redone_once(ray_cluster, tiny_dir, tmp_path, monkeypatch):
    """The actor dies (os._exit) right after writing its first shard, before reporting it: Ray
    restarts it and retries that shard, which is found written and not written again."""
    prompts = write_prompts(tmp_path / "p.txt", 6)
    marker = tmp_path / "crashed"
    cfg = ScanConfig(model=tiny_dir, shard_size=2, num_inference_steps=SAMPLING, threshold=0.5)
    for when in ("after", "before"):
        marker.unlink(missing_ok=True)
        with monkeypatch.context() as m:
            m.setattr(ray_engine, "ScanActor", crashing_scan_actor(marker, when))
            out = tmp_path / when
            s = scan(prompts, out, dataclasses.replace(cfg, engine="ray", workers=1))
        assert marker.exists(), "the worker did not crash"
        assert s["scored_shards"] == 3
        rows = read_scan(out)
        assert rows["prompt_id"] == [str(i) for i in range(6)]
        ref = tmp_path / f"ref_{when}"
        scan(prompts, ref, cfg)
        assert read_scan(ref) == rows


@pytest.mark.slow
def test_ray_worker_error_is_one_line(ray_cluster, tiny_dir, tmp_path, capsys):
    from diffmem.cli import main

    lines = [json.dumps({"prompt": f"p{i}"}) for i in range(5)]
    lines[3] = "{not json"
    (tmp_path / "late.jsonl").write_text("\n".join(lines))
    rc = main(["scan", str(tmp_path / "late.jsonl"), "--out", str(tmp_path / "s"), "--engine",
               "ray", "--model", str(tiny_dir), "--sampling-steps", str(SAMPLING),
               "--threshold", "0.5", "--shard-size", "2", "--no-progress"])
    err = capsys.readouterr().err
    [line] = [ln for ln in err.splitlines() if ln.startswith("diffmem: error")]
    assert rc == 2 and line.endswith("late.jsonl:4: not valid JSON (Expecting property name "
                                     "enclosed in double quotes)"), err


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_ray_index_build_equals_local(ray_cluster, tmp_path):
    from diffmem.scale.index_build import build_index_sharded
    from diffmem.similarity.index import TrainingIndex
    from diffmem.similarity.index_ingest import build_index_from_source

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(7):
        (folder / f"im{i}.png").write_bytes(png(i))
        (folder / f"im{i}.txt").write_text(f"caption {i % 3}")
    (folder / "broken.png").write_bytes(b"not an image")
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": [png(10 + i) if i != 2 else b"junk" for i in range(6)],
                             "caption": [f"c{i}" for i in range(6)]}), table, row_group_size=4)
    for source in (folder, table):
        local = build_index_from_source(source, tmp_path / "local", kind="pixel", batch_size=2)
        remote = build_index_sharded(source, tmp_path / "ray", kind="pixel", batch_size=2,
                                     shard_size=3, workers=2)
        assert remote.count == local.count
        # (a decoder's message may name a buffer's address, which differs between processes)
        assert [(x["id"], x["source"]) for x in remote.skipped] == \
            [(x["id"], x["source"]) for x in local.skipped] and len(local.skipped) == 1
        a, b = TrainingIndex.load(local.out), TrainingIndex.load(remote.out)
        assert a.ids == b.ids and a.item_captions == b.item_captions and a.sources == b.sources
        assert np.array_equal(a.pixel_array(), b.pixel_array())
        assert a.meta() == b.meta()

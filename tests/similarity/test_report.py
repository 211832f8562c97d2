"""eval_replication: JSON fields, skipped files, HTML grid with embedded images."""

from __future__ import annotations

import json

import torch
from PIL import Image

from diffmem.similarity.index import PixelSpace, TrainingIndex
from diffmem.similarity.report import eval_replication


def test_eval_replication_writes_report_and_grid(tmp_path):
    g = torch.Generator().manual_seed(0)
    train = torch.rand(10, 3, 16, 16, generator=g) * 2 - 1
    index = TrainingIndex.build(train, [f"c{i % 3}" for i in range(10)],
                                embedder=PixelSpace(size=16, grid=4))
    index.save(tmp_path / "idx")
    gen = tmp_path / "gen"
    gen.mkdir()
    copy = ((train[2] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(copy).save(gen / "a_copy.png")
    Image.new("RGB", (16, 16), (128, 128, 128)).save(gen / "b_flat.png")
    (gen / "c_broken.png").write_bytes(b"not an image")
    report = eval_replication(gen, tmp_path / "idx", tmp_path / "r.json",
                              grid_html=tmp_path / "r.html")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["memorization_rate"] == 0.5 and saved["criterion"] == "tiled_l2"
    for key in ("similarity_mean", "similarity_p95", "skipped", "per_image"):
        assert key in saved
    assert [s["path"].endswith("c_broken.png") for s in report["skipped"]] == [True]
    assert report["per_image"][0]["nearest_id"] == "2"
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "c2" in page

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
    (gen / "a_copy.txt").write_text("the gargoyle origami poster", encoding="utf-8")
    Image.new("RGB", (16, 16), (128, 128, 128)).save(gen / "b_flat.png")
    (gen / "c_broken.png").write_bytes(b"not an image")
    report = eval_replication(gen, tmp_path / "idx", tmp_path / "r.json",
                              grid_html=tmp_path / "r.html")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["memorization_rate"] == 0.5 and saved["criterion"] == "tiled_l2"
    # a distance: its copy-like tail is the 5th percentile, named so (never "p95")
    for key in ("distance_mean", "distance_p5", "skipped", "per_image"):
        assert key in saved
    assert "similarity_p95" not in saved and saved["copy_tail_percentile"] == 5
    # the default tiled-L2 threshold is the testbed's replication threshold
    from diffmem.testbed.verify import REPLICATION_THRESHOLD

    assert saved["threshold"] == REPLICATION_THRESHOLD == 0.15
    assert saved["copy_rule"] == "score < 0.15"
    assert [s["path"].endswith("c_broken.png") for s in report["skipped"]] == [True]
    first = report["per_image"][0]
    assert first["nearest_id"] == "2" and first["copy"] is True
    assert first["prompt"] == "the gargoyle origami poster" and report["per_image"][1]["copy"] is False
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "c2" in page
    assert "the gargoyle origami poster" in page  # each image's prompt
    assert page.count("<tr class='copy'>") == 1 and page.count("<tr class='novel'>") == 1
    assert "5th percentile" in page and "p95" not in page
    assert "tiled_l2" in page and "score &lt; 0.15" in page


def test_eval_replication_of_an_empty_folder_is_an_error(tmp_path):
    import pytest

    from diffmem.runtime.errors import EmptyInputError

    (tmp_path / "gen").mkdir()
    with pytest.raises(EmptyInputError, match="holds no images"):
        eval_replication(tmp_path / "gen", tmp_path / "no-index", tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()

"""TrainingIndex: exact search == brute force, IVF-PQ sanity, persistence, refusal, bad files."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from diffmem.similarity.index import (
    IndexMismatchError,
    PixelSpace,
    TrainingIndex,
    build_index_from_source,
)
from diffmem.similarity.pixel import pairwise_tiled_l2


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_exact_search_equals_brute_force(embedder, images):
    captions = [f"cap {i % 5}" for i in range(len(images))]
    index = TrainingIndex.build(images, captions, embedder=embedder, batch_size=5)
    assert index.index_type == "flat" and len(index) == 24
    noise = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    queries = images[:6] + 0.1 * noise
    res = index.search(queries, k=3)
    sims = embedder.embed(queries) @ embedder.embed(images).T
    want_s, want_i = sims.topk(3, dim=1)
    assert res.indices.tolist() == want_i.tolist()
    torch.testing.assert_close(res.scores, want_s, rtol=1e-5, atol=1e-5)
    assert res.captions[0][0] == captions[want_i[0, 0]]
    assert res.caption_counts[0][0] == sum(c == captions[want_i[0, 0]] for c in captions)


def test_ivfpq_returns_sane_results(embedder):
    base = _unit(2000, 48, 0)
    index = TrainingIndex(embedder, ivf_threshold=1000, pq_m=8, nprobe=8)
    index.add(None, ["c"] * 2000, [f"id{i}" for i in range(2000)], embeddings=base).optimize()
    assert index.index_type == "ivfpq"
    queries = F.normalize(base[:50] + 0.05 * _unit(50, 48, 1), dim=-1)  # near-duplicates
    res = index.search(queries, k=5)
    hit = sum(i in row for i, row in enumerate(res.indices.tolist()))
    assert hit >= 45  # near-duplicates are found despite PQ compression
    assert res.ids[0][0] == "id0" or res.scores[0, 0] > 0.5


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip(tmp_path, embedder, images, mmap):
    index = TrainingIndex.build(images, [f"c{i}" for i in range(24)], [f"x{i}" for i in range(24)],
                                embedder=embedder)
    index.save(tmp_path / "idx")
    back = TrainingIndex.load(tmp_path / "idx", embedder=embedder, mmap=mmap)
    assert back.ids == index.ids and back.captions == index.captions
    a, b = index.search(images[:4], k=2), back.search(images[:4], k=2)
    assert a.indices.tolist() == b.indices.tolist()
    torch.testing.assert_close(a.scores, b.scores)
    if mmap:
        with pytest.raises(Exception, match="read-only"):
            back.add(images[:1], ["new"], ["new"])
    else:
        back.add(images[:1], ["new"], ["new"])
        assert len(back) == 25 and back.caption_counts["new"] == 1


def test_ivfpq_round_trip_mmap(tmp_path, embedder):
    base = _unit(1500, 48, 4)
    index = TrainingIndex(embedder, ivf_threshold=100, pq_m=8)
    index.add(None, ["c"] * 1500, [str(i) for i in range(1500)], embeddings=base).optimize()
    index.save(tmp_path / "ivf")
    back = TrainingIndex.load(tmp_path / "ivf", embedder=embedder, mmap=True)
    assert back.index_type == "ivfpq"
    want = index.search(base[:10], k=3).indices.tolist()
    assert back.search(base[:10], k=3).indices.tolist() == want


def test_mismatched_embedder_is_refused(tmp_path, embedder, images):
    TrainingIndex.build(images, ["c"] * 24, embedder=embedder).save(tmp_path / "idx")
    other = type(embedder)()
    other.name = "another-model"
    with pytest.raises(IndexMismatchError, match="another-model"):
        TrainingIndex.load(tmp_path / "idx", embedder=other)
    other = type(embedder)()
    other.preprocessing = "resize999"
    with pytest.raises(IndexMismatchError, match="preprocessing"):
        TrainingIndex.load(tmp_path / "idx", embedder=other)


def test_pixel_index_equals_brute_force(tmp_path):
    g = torch.Generator().manual_seed(5)
    train = torch.rand(30, 3, 16, 16, generator=g) * 2 - 1
    space = PixelSpace(size=16, grid=4)
    index = TrainingIndex.build(train, [f"c{i}" for i in range(30)], embedder=space)
    index.save(tmp_path / "pix")
    back = TrainingIndex.load(tmp_path / "pix")  # pixel space rebuilt from meta.json
    queries = train[:4] + 0.02 * torch.randn(4, 3, 16, 16, generator=g)
    res = back.search(queries, k=2)
    stored = torch.from_numpy(np.array(back.pixel_array())).float() / 127.5 - 1
    d = pairwise_tiled_l2(queries.clamp(-1, 1), stored, grid=4)
    want_d, want_i = d.topk(2, dim=1, largest=False)
    assert res.indices.tolist() == want_i.tolist() and res.indices[:, 0].tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(res.scores, want_d)
    assert not res.higher_is_better and res.criterion == "tiled_l2"


def _png(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_folder_source_skips_corrupt_images(tmp_path, embedder):
    src = tmp_path / "train"
    src.mkdir()
    for i, rgb in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        (src / f"img{i}.png").write_bytes(_png(rgb))
        (src / f"img{i}.txt").write_text(f"caption {i}")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (src / "broken.txt").write_text("never indexed")
    report = build_index_from_source(src, tmp_path / "idx", embedder=embedder)
    assert report.count == 3
    assert [s["id"] for s in report.skipped] == ["broken"] and report.skipped[0]["error"]
    assert (tmp_path / "idx" / "skipped.json").exists()
    index = TrainingIndex.load(tmp_path / "idx", embedder=embedder)
    assert index.captions == ["caption 0", "caption 1", "caption 2"]
    assert index.image(1)[1].mean() > 0.9  # reopened from its source: the green image


def test_parquet_source_skips_corrupt_rows(tmp_path):
    images = [_png((10, 20, 30)), b"garbage", _png((200, 0, 0))]
    table = pa.table({"image": images, "caption": ["a", "b", "c"]})
    pq.write_table(table, tmp_path / "t.parquet")
    report = build_index_from_source(tmp_path / "t.parquet", tmp_path / "idx", kind="pixel")
    assert report.count == 2 and report.skipped[0]["source"].endswith("#row=1")
    index = TrainingIndex.load(tmp_path / "idx")
    assert index.captions == ["a", "c"] and index.index_type == "pixel"

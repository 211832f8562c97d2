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

from diffmem.similarity.index import IndexMismatchError, PixelSpace, TrainingIndex
from diffmem.similarity.index_ingest import build_index_from_source
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


def test_captions_copies_and_provenance_round_trip(tmp_path):
    g = torch.Generator().manual_seed(7)
    train = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    captions = [["a cat", "a cat, photo"], "a dog", ["a cat"], ["x", "y", "z"]]
    index = TrainingIndex.build(train, captions, embedder=PixelSpace(size=16), copies=[4, 1, 2, 3],
                                provenance={"training_set": "testbed:abc"})
    assert index.captions == ["a cat", "a dog", "a cat", "x"]
    assert index.item_captions[0] == ["a cat", "a cat, photo"]
    # copies are spread over an item's captions: 4/2 + 2/1 training occurrences of "a cat"
    assert index.caption_counts["a cat"] == 4 and index.caption_counts["x"] == 1
    assert index.caption_occurrences([0, 1, -1]) == {"a cat": 2, "a cat, photo": 2, "a dog": 1}
    index.save(tmp_path / "idx")
    back = TrainingIndex.load(tmp_path / "idx")
    assert back.item_captions == index.item_captions and back.copies == [4, 1, 2, 3]
    assert back.caption_counts == index.caption_counts
    assert back.provenance == {"training_set": "testbed:abc"}
    res = back.search(train[:1], k=1)
    assert res.captions[0][0] == "a cat" and res.caption_counts[0][0] == 4
    torch.testing.assert_close(back.references([2, 0]),
                               torch.from_numpy(np.array(back.pixel_array()[[2, 0]])).float()
                               / 127.5 - 1)


def test_index_saved_without_captions_column_still_loads(tmp_path, embedder, images):
    TrainingIndex.build(images[:3], ["a", "b", "a"], embedder=embedder).save(tmp_path / "idx")
    items = pq.read_table(tmp_path / "idx" / "items.parquet")
    pq.write_table(items.select(["id", "caption", "source"]), tmp_path / "idx" / "items.parquet")
    back = TrainingIndex.load(tmp_path / "idx", embedder=embedder)
    assert back.item_captions == [["a"], ["b"], ["a"]] and back.copies == [1, 1, 1]
    assert back.caption_counts["a"] == 2
    torch.testing.assert_close(back.references([1]), embedder.embed(images[1:2]), atol=1e-6,
                               rtol=1e-5)


def test_parquet_image_is_read_by_row_group(tmp_path, monkeypatch):
    """Reopening one training image of a Parquet table reads its row group only (the image
    column of ~8 rows), not the whole column, and neighbouring rows come from the cache."""
    from diffmem.similarity import sources

    rows = 200
    table = pa.table({"image": [_png((i, 255 - i, 7)) for i in range(rows)],
                      "caption": [f"c{i}" for i in range(rows)]})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=8)
    reads: list[tuple[int, list]] = []
    real = pq.ParquetFile.read_row_group

    def counting(self, i, columns=None, **kw):
        reads.append((i, columns))
        return real(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("whole table read"))
    sources._row_group_column.cache_clear()
    img = sources.load_source_image(f"{path}#row=123")
    assert img is not None and round(float((img[0, 0, 0] + 1) * 127.5)) == 123
    assert reads == [(15, ["image"])]  # rows 120-127
    assert sources.load_source_image(f"{path}#row=125") is not None
    assert len(reads) == 1  # same row group: cached
    assert sources.load_source_image(f"{path}#row={rows}") is None  # out of range
    assert sources.load_source_image(f"{tmp_path / 'gone.parquet'}#row=1") is None


def test_pixel_search_prepares_the_stored_images_once(monkeypatch):
    """Repeated searches (AMG searches at every step) reuse the stored images' float tiles; an
    index over the cache budget streams them in chunks with the same result."""
    from diffmem.similarity import index as index_module

    g = torch.Generator().manual_seed(9)
    train = torch.rand(40, 3, 16, 16, generator=g) * 2 - 1
    cached = TrainingIndex.build(train, ["c"] * 40, embedder=PixelSpace(size=16))
    streamed = TrainingIndex.build(train, ["c"] * 40, embedder=PixelSpace(size=16),
                                   pixel_cache_bytes=0)
    calls = []
    real = index_module.prepare_tiles
    monkeypatch.setattr(index_module, "prepare_tiles", lambda *a, **k: calls.append(1) or real(*a, **k))
    queries = train[:5] + 0.05 * torch.randn(5, 3, 16, 16, generator=g)
    for _ in range(3):
        a = cached.search(queries, k=3)
    assert len(calls) == 1
    b = streamed._search_pixels(queries.clamp(-1, 1), 3, chunk=7)
    assert len(calls) == 1 + 6  # 40 images in chunks of 7, prepared at every search
    assert a.indices.tolist() == b[1].tolist()
    torch.testing.assert_close(a.scores, b[0])
    cached.add(train[:1], ["new"], ["new"])  # the cache follows the stored images
    assert cached.search(train[:1], k=2).indices[0].tolist() in ([0, 40], [40, 0])


def test_load_index_opens_a_folder_and_passes_an_index_through(tmp_path):
    from diffmem.runtime.errors import ConfigError
    from diffmem.similarity.index import load_index

    index = TrainingIndex.build(torch.rand(2, 3, 16, 16) * 2 - 1, ["a", "b"],
                                embedder=PixelSpace(size=16))
    index.save(tmp_path / "idx")
    assert load_index(index, what="x") is index
    assert load_index(str(tmp_path / "idx"), what="x").ids == ["0", "1"]
    assert load_index(None, what="x") is None
    with pytest.raises(ConfigError, match=r"^x needs an index$"):
        load_index(None, what="x", missing="x needs an index")
    with pytest.raises(ConfigError, match="x: index must be a TrainingIndex or its folder, got int"):
        load_index(3, what="x")


def test_an_sscd_index_reopens_with_its_lowpass_and_refuses_another(tmp_path):
    from diffmem.similarity.sscd import SSCD

    images = torch.rand(3, 3, 64, 64) * 2 - 1
    TrainingIndex.build(images, ["a", "b", "c"], ["0", "1", "2"],
                        SSCD(threads=1, lowpass=32)).save(tmp_path / "i")
    opened = TrainingIndex.load(tmp_path / "i")  # the embedder is rebuilt from meta.json
    assert opened.embedder.lowpass == 32
    assert opened.search(images[1:2], k=1).ids[0][0] == "1"
    with pytest.raises(IndexMismatchError, match="preprocessing"):
        TrainingIndex.load(tmp_path / "i", embedder=SSCD(threads=1))

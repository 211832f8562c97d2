"""Table sources: a bad column option or a file that is no table is one diffmem error (exit 2 on
the command line), found before any row is read or any embedder loads."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffmem.cli import main
from diffmem.runtime.errors import ConfigError, DiffmemError
from diffmem.similarity.index_ingest import build_index_from_source
from diffmem.similarity.sources import iter_source


@pytest.fixture
def table(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="PNG")
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"img": [buf.getvalue()], "text": ["a red square"],
                             "key": ["r1"]}), path)
    return path


def test_bad_column_options_raise_config_error_at_once(table):
    with pytest.raises(ConfigError, match=r"no caption column 'caption'; its columns are: img, "
                                          r"text, key"):
        iter_source(table, image_column="img")  # not iterated: the check comes first
    with pytest.raises(ConfigError, match=r"no image column 'image' and no id column 'id'"):
        iter_source(table, caption_column="text", id_column="id")
    [item] = iter_source(table, image_column="img", caption_column="text", id_column="key")
    assert (item.id, item.caption, tuple(item.image.shape)) == ("r1", "a red square", (3, 16, 16))


def test_not_a_table_is_a_diffmem_error(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DiffmemError, match=r"could not read .*bad\.parquet as Parquet"):
        iter_source(bad)


def test_index_build_checks_columns_before_loading_the_embedder(table, tmp_path):
    class Unloadable:
        def embed(self, images):
            raise AssertionError("the embedder must not run")

    with pytest.raises(ConfigError, match="no image column"):
        build_index_from_source(table, tmp_path / "idx", embedder=Unloadable(),
                                caption_column="text")
    assert not (tmp_path / "idx").exists()


def test_cli_bad_column_is_one_line_exit_2(table, tmp_path, capsys):
    rc = main(["index", "build", str(table), "--out", str(tmp_path / "idx"),
               "--image-column", "img", "--caption-column", "caption_text"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.startswith("diffmem: error:") and err.count("\n") == 1
    assert "no caption column 'caption_text'" in err and "Traceback" not in err
    assert not (tmp_path / "idx").exists()


def test_jsonl_source_paths_captions_and_bad_lines(tmp_path):
    import json

    (tmp_path / "img").mkdir()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(tmp_path / "img" / "g.png")
    rows = [{"image": "img/g.png", "caption": "a green square", "key": "g"},
            {"image": str(tmp_path / "img" / "g.png"), "caption": ["first", "second"], "key": "h"},
            {"image": "img/missing.png", "caption": "gone", "key": "m"},
            {"caption": "no image", "key": "n"}]
    src = tmp_path / "set.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n[1, 2]\n{broken\n")
    items = list(iter_source(src, id_column="key"))
    assert [it.id for it in items] == ["g", "h", "m", "n", "4", "5"]
    assert (items[0].caption, tuple(items[0].image.shape)) == ("a green square", (3, 16, 16))
    assert (items[1].caption, items[1].captions) == ("first", ["first", "second"])
    assert [it.image is None for it in items] == [False, False, True, True, True, True]
    assert "file not found" in items[2].error and "no 'image' path" in items[3].error
    assert "no JSON object" in items[4].error and "bad JSON" in items[5].error
    report = build_index_from_source(src, tmp_path / "index", kind="pixel")
    assert report.count == 2 and len(report.skipped) == 4

"""Table sources: a bad column option or a file that is no table is one diffmem error (exit 2 on
the command line), found before any row is read or any embedder loads."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffmem.cli import main
from diffmem.errors import ConfigError, DiffmemError
from diffmem.similarity.index import build_index_from_source
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

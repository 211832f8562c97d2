"""Prompt sources read as a stream and cut into shards: formats, shard starts across files, ids,
and one clear error for each kind of bad input."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffmem.runtime.errors import PromptError
from diffmem.scale.stream import plan_shards, read_shard


def all_records(plan):
    return [r for s in plan.shards for r in read_shard(plan, s)]


@pytest.fixture
def mixed(tmp_path):
    """A folder of three files (sorted: a.txt, b.jsonl, c.parquet) holding prompts p0..p9."""
    d = tmp_path / "log"
    d.mkdir()
    (d / "a.txt").write_text("p0\n\n  p1  \np2\n", encoding="utf-8")
    (d / "b.jsonl").write_text("\n".join(json.dumps({"prompt": f"p{i}", "id": f"j{i}"})
                                         for i in (3, 4, 5)) + "\n", encoding="utf-8")
    # two row groups, so a shard start falls inside the second
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(6, 10)],
                             "id": [f"q{i}" for i in range(6, 10)]}), d / "c.parquet",
                   row_group_size=2)
    (d / "notes.md").write_text("not a prompt file")
    return d


@pytest.mark.parametrize("shard_size", [1, 2, 3, 4, 10, 11])
def test_shards_cover_the_stream_once_in_order(mixed, shard_size):
    plan = plan_shards(mixed, shard_size)
    assert plan.total == 10
    assert [s.count for s in plan.shards] == [min(shard_size, 10 - i)
                                              for i in range(0, 10, shard_size)]
    recs = all_records(plan)
    assert [r.prompt for r in recs] == [f"p{i}" for i in range(10)]
    assert [r.prompt_id for r in recs] == [str(i) for i in range(10)]
    assert recs[1].source == "a.txt:2" and recs[3].source == "b.jsonl:1"
    assert recs[9].source == "c.parquet#row=3"


def test_id_column_and_prompt_column(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"t{i}", "key": i}) for i in range(5)))
    plan = plan_shards(f, 2, prompt_column="text", id_column="key")
    recs = all_records(plan)
    assert [r.prompt for r in recs] == [f"t{i}" for i in range(5)]
    assert [r.prompt_id for r in recs] == [str(i) for i in range(5)]
    t = tmp_path / "x.parquet"
    pq.write_table(pa.table({"caption": ["c0", "c1", "c2"], "uid": ["a", "b", "c"]}), t)
    recs = all_records(plan_shards(t, 2, id_column="uid"))
    assert [(r.prompt_id, r.prompt) for r in recs] == [("a", "c0"), ("b", "c1"), ("c", "c2")]


def test_plan_keeps_only_shard_starts(tmp_path):
    f = tmp_path / "big.txt"
    f.write_text("".join(f"prompt {i}\n" for i in range(1000)))
    plan = plan_shards(f, 256)
    assert len(plan.shards) == 4 and plan.shards[-1].count == 1000 - 3 * 256
    assert read_shard(plan, plan.shards[2])[0].prompt == "prompt 512"
    # the plan round-trips through its dict form (what a worker gets)
    again = type(plan).from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.shards == plan.shards and again.digest() == plan.digest()


def test_bad_inputs_one_clear_error(tmp_path, mixed):
    with pytest.raises(PromptError, match="no prompt column 'text'"):
        plan_shards(mixed, 4, prompt_column="text")
    (mixed / "d.txt").write_text("\n \n")
    with pytest.raises(PromptError, match=r"d\.txt contains no prompts"):
        plan_shards(mixed, 4)
    (mixed / "d.txt").unlink()
    (mixed / "e.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(PromptError, match=r"could not read .*e\.parquet as Parquet"):
        plan_shards(mixed, 4)
    (mixed / "e.parquet").unlink()
    (mixed / "f.txt").write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(PromptError, match=r"f\.txt:2 is not UTF-8"):
        plan_shards(mixed, 4)
    with pytest.raises(PromptError, match="no id column 'nope'"):
        plan_shards(tmp_path / "log" / "c.parquet", 4, id_column="nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PromptError, match="holds no prompt files"):
        plan_shards(empty, 4)
    with pytest.raises(PromptError, match="does not exist"):
        plan_shards(tmp_path / "missing.txt", 4)

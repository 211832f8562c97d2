"""`diffmem index build` and `diffmem eval replication` end to end on a small folder."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from diffmem.cli import main
from diffmem.testbed.data import TestbedSpec
from diffmem.testbed.index import build_testbed_index

SMALL = TestbedSpec(n_generic=10, n_verbatim=2, n_template=1, template_variants=3,
                    template_eval_variants=2, n_heldout_compositions=2)


def test_testbed_index_finds_its_own_images(tmp_path):
    from diffmem.similarity.pixel import to_tensor
    from diffmem.testbed.data import build_testbed

    index = build_testbed_index(tmp_path / "idx", spec=SMALL)
    tb = build_testbed(SMALL)
    assert len(index) == len(tb.items)
    item, img = next(tb.images(["verbatim"]))
    found = index.search(to_tensor(img[None]), k=1)
    assert found.ids[0][0] == item.image_id and float(found.scores[0, 0]) < 0.01


def test_index_build_and_eval_replication_cli(tmp_path, capsys):
    src = tmp_path / "train"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        arr = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(src / f"im{i}.png")
        (src / f"im{i}.txt").write_text(f"caption {i}")
    (src / "broken.png").write_bytes(b"not an image")
    (src / "broken.txt").write_text("broken")
    assert main(["index", "build", str(src), "--kind", "pixel", "--out", str(tmp_path / "idx")]) == 0
    assert "skipped 1" in capsys.readouterr().out
    gen = tmp_path / "gen"
    gen.mkdir()
    Image.open(src / "im2.png").save(gen / "copy.png")
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(gen / "novel.png")
    (gen / "bad.png").write_bytes(b"garbage")
    out = tmp_path / "report.json"
    assert main(["eval", "replication", str(gen), "--index", str(tmp_path / "idx"),
                 "--out", str(out), "--grid", str(tmp_path / "grid.html")]) == 0
    report = json.loads(out.read_text())
    assert report["n_images"] == 2 and len(report["skipped"]) == 1
    assert report["memorization_rate"] == 0.5
    assert (tmp_path / "grid.html").read_text().count("<img") >= 2


def test_testbed_index_keeps_captions_copies_and_provenance():
    from diffmem.testbed.data import build_testbed
    from diffmem.testbed.index import memorized_copies, testbed_fingerprint

    index = build_testbed_index(spec=SMALL)
    tb = build_testbed(SMALL)
    template = next(it for it in tb.items if it.kind == "template")
    row = index.ids.index(template.image_id)
    assert index.item_captions[row] == template.captions and len(template.captions) == 3
    dup = memorized_copies(SMALL)
    assert dup == round((0.45 / 3) / (0.55 / 10)) and index.copies[row] == dup
    assert index.copies[index.ids.index("generic-00000")] == 1
    assert index.provenance == {"training_set": testbed_fingerprint(SMALL)}
    assert testbed_fingerprint(SMALL) != testbed_fingerprint(TestbedSpec())


def test_index_build_graded_testbed_sscd_uses_its_lowpass_and_the_originals(graded_model, tmp_path,
                                                                             capsys):
    from diffmem.models.profile import read_profile
    from diffmem.similarity.index import load_index
    from diffmem.similarity.pixel import to_tensor
    from diffmem.testbed.data import build_testbed
    from diffmem.testbed.locate import testbed_spec_of

    assert read_profile(graded_model).sscd_lowpass == testbed_spec_of(graded_model).resolution // 2
    assert main(["index", "build", "testbed-graded", "--kind", "sscd", "--out",
                 str(tmp_path / "idx")]) == 0
    assert "the originals" in capsys.readouterr().out
    index = load_index(tmp_path / "idx", what="test")
    assert index.embedder.lowpass == read_profile(graded_model).sscd_lowpass
    item, img = next(build_testbed(testbed_spec_of(graded_model)).images())
    found = index.search(to_tensor(img[None]), k=1)  # an original finds itself at cosine ~1
    assert found.ids[0][0] == item.image_id and float(found.scores[0, 0]) > 0.99


def test_the_graded_testbed_accepts_its_sscd_index_as_a_second_criterion(graded_model, tmp_path):
    import pytest

    from diffmem.models.adapter import load_adapter
    from diffmem.runtime.errors import ConfigError
    from diffmem.similarity.index import load_index
    from diffmem.similarity.index_compat import check_index_model

    adapter = load_adapter("testbed-graded")
    assert main(["index", "build", "testbed-graded", "--kind", "sscd", "--out",
                 str(tmp_path / "own")]) == 0
    check_index_model(load_index(tmp_path / "own", what="test"), adapter)  # accepted
    assert main(["index", "build", "testbed-graded", "--kind", "sscd", "--lowpass", "16",
                 "--out", str(tmp_path / "other")]) == 0
    with pytest.raises(ConfigError, match="low-passes its images"):
        check_index_model(load_index(tmp_path / "other", what="test"), adapter)
    assert main(["index", "build", "testbed-graded", "--out", str(tmp_path / "pixel")]) == 0
    check_index_model(load_index(tmp_path / "pixel", what="test"), adapter)  # its first criterion

"""testbed verify: the report's fields, on a tiny random pipeline and a small data spec."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import pytest
import torch

from diffmem.cli import main
from diffmem.eval.detection import labelled_testbed_prompts
from diffmem.models.adapter import load_adapter
from diffmem.runtime.errors import ConfigError
from diffmem.testbed import shipped_testbed_spec, spec_of
from diffmem.testbed.data import TestbedSpec, build_testbed
from diffmem.testbed.locate import testbed_spec_of as read_spec
from diffmem.testbed.verify import training_nn_distances, verify_testbed

SMALL = TestbedSpec(n_generic=30, n_verbatim=2, n_template=1, template_variants=3,
                    template_eval_variants=2, n_heldout_compositions=3, resolution=16)


def test_training_nn_distance_sees_a_duplicate_and_ignores_self():
    torch.manual_seed(0)
    refs = torch.rand(20, 3, 32, 32) * 2 - 1
    refs[7] = refs[3]  # one exact duplicate
    floor = training_nn_distances(refs, n_queries=20)
    assert floor[0] < 1e-3  # the duplicate pair
    assert floor[2] > 0.3  # random images are far apart; a query never matches itself


def test_spec_of_a_folder_from_before_rare_words_has_none(tmp_path):
    old = {k: v for k, v in asdict(SMALL).items() if k != "n_rare_words"}
    (tmp_path / "testbed.json").write_text(json.dumps(old))
    assert read_spec(tmp_path).n_rare_words == 0
    (tmp_path / "testbed.json").write_text(json.dumps(asdict(SMALL)))
    assert read_spec(tmp_path) == SMALL
    assert TestbedSpec().n_rare_words > 0  # the default data carries rare words


def test_shipped_testbed_was_trained_on_the_default_data():
    # `diffmem testbed train` with no options must rebuild the shipped model's data
    assert shipped_testbed_spec() == TestbedSpec()


@pytest.fixture
def small_testbed_dir(tiny_dir, tmp_path):
    """The tiny pipeline as a testbed model trained on SMALL (a folder with testbed.json)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    (model / "testbed.json").write_text(json.dumps(asdict(SMALL)))
    return model


def test_spec_comes_from_what_the_adapter_recorded(tiny_dir, tiny_pipe, small_testbed_dir):
    with pytest.raises(ConfigError, match=r"no testbed\.json"):
        read_spec(tiny_dir)
    assert spec_of(load_adapter(tiny_dir)) is None
    assert spec_of(load_adapter(tiny_pipe)) is None  # a pipeline object: no folder known
    adapter = load_adapter(small_testbed_dir)
    assert spec_of(adapter) == SMALL
    small = build_testbed(SMALL).prompts
    assert labelled_testbed_prompts(adapter)[0] == labelled_testbed_prompts(small_testbed_dir)[0] \
        == [p.prompt for p in small]
    # the profile a testbed folder gets (lower layers read it as data, never import the testbed)
    from diffmem.testbed.profile import ensure_testbed_profile

    profile = ensure_testbed_profile(small_testbed_dir)
    assert list(profile.clean_prompts) == [p.prompt for p in small if p.kind == "heldout"]
    assert load_adapter(small_testbed_dir).profile.clean_prompts == profile.clean_prompts
    assert load_adapter(tiny_dir).profile.clean_prompts == ()
    assert not load_adapter(tiny_dir).profile.is_testbed
    with pytest.raises(ConfigError, match="needs a diffmem testbed model"):
        labelled_testbed_prompts(tiny_dir)


@pytest.mark.parametrize("argv", [["testbed", "verify", "--out", "{tmp}/r.json"],
                                  ["testbed", "prompts", "--out", "{tmp}/p.jsonl"],
                                  ["eval", "detection", "--out", "{tmp}/d.json"],
                                  ["demo", "--out", "{tmp}/demo"]])
def test_commands_refuse_a_model_that_is_no_testbed_at_once(tiny_dir, tmp_path, capsys,
                                                            monkeypatch, argv):
    import diffmem.testbed.verify as verify

    def no_generation(*args, **kwargs):
        raise AssertionError("must fail before generating")

    monkeypatch.setattr(verify, "generate_labelled", no_generation)
    monkeypatch.setattr(verify, "training_images", no_generation)
    rc = main([a.format(tmp=tmp_path) for a in argv] + ["--model", str(tiny_dir)])
    err = capsys.readouterr().err
    # one error line (diffusers' loading progress bar may precede it), no traceback
    last = err.splitlines()[-1]
    assert rc == 2 and err.count("diffmem: error") == 1 and "Traceback" not in err
    assert last.startswith("diffmem: error:") and "needs a diffmem testbed model" in last
    assert str(tiny_dir) in last
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_testbed_prompts_of_a_testbed_folder(small_testbed_dir, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    assert main(["testbed", "prompts", "--out", str(out), "--model", str(small_testbed_dir)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p.prompt for p in build_testbed(SMALL).prompts]


def test_verify_report_on_tiny_pipeline(small_testbed_dir, tmp_path):
    report = verify_testbed(small_testbed_dir, out=tmp_path / "r.json", seeds=1, steps=2, with_sscd=False)
    assert json.loads((tmp_path / "r.json").read_text())["criterion"] == report["criterion"]
    for kind in ("verbatim", "template", "heldout"):
        assert 0.0 <= report[f"{kind}_replication_rate"] <= 1.0
    assert report["n_verbatim_prompts"] == 2 and report["n_template_prompts"] == 2
    assert report["n_training_images"] == 33
    assert len(report["training_nn_distance_percentiles_1_5_50"]) == 3
    assert len(report["prompts"]) == len({p["prompt"] for p in report["prompts"]})


def test_verify_judges_the_graded_testbed_by_sscd_with_its_lowpass(graded_model, tmp_path):
    from diffmem.models.profile import read_profile
    from diffmem.similarity.sscd import lowpass_of

    report = verify_testbed("testbed-graded", out=tmp_path / "r.json", seeds=1, steps=2)
    assert lowpass_of(report["sscd_preprocessing"]) == read_profile(graded_model).sscd_lowpass
    for p in report["prompts"]:
        assert len(p["sscd"]) == len(p["sscd_best"]) == len(p["distances"]) == 1
        # the best over the training set is at least the cosine to the tiled-L2 nearest original
        assert p["sscd_best"][0] >= p["sscd"][0] - 1e-4
    assert "sscd_per_image" not in report

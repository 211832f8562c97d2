"""testbed verify: the report's fields, on a tiny random pipeline and a small data spec."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import torch

from diffmem.testbed.data import TestbedSpec
from diffmem.testbed.verify import testbed_spec_of as spec_of
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
    assert spec_of(tmp_path).n_rare_words == 0
    (tmp_path / "testbed.json").write_text(json.dumps(asdict(SMALL)))
    assert spec_of(tmp_path) == SMALL
    assert TestbedSpec().n_rare_words > 0  # the default data carries rare words


def test_shipped_testbed_was_trained_on_the_default_data():
    # `diffmem testbed train` with no options must rebuild the shipped model's data
    assert spec_of("testbed") == TestbedSpec()


def test_verify_report_on_tiny_pipeline(tiny_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    (model / "testbed.json").write_text(json.dumps(asdict(SMALL)))
    report = verify_testbed(model, out=tmp_path / "r.json", seeds=1, steps=2, with_sscd=False)
    assert json.loads((tmp_path / "r.json").read_text())["criterion"] == report["criterion"]
    for kind in ("verbatim", "template", "heldout"):
        assert 0.0 <= report[f"{kind}_replication_rate"] <= 1.0
    assert report["n_verbatim_prompts"] == 2 and report["n_template_prompts"] == 2
    assert report["n_training_images"] == 33
    assert len(report["training_nn_distance_percentiles_1_5_50"]) == 3
    assert len(report["prompts"]) == len({p["prompt"] for p in report["prompts"]})

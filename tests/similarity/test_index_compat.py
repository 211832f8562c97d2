"""check_index_matches: an index is refused for a model whose training set it does not hold."""

from __future__ import annotations

import pytest
import torch

from diffmem.runtime.errors import ConfigError
from diffmem.similarity.index import PixelSpace, TrainingIndex
from diffmem.similarity.index_compat import (
    check_index_matches,
    model_training_set,
)

MINE, OTHER = "testbed:0123456789ab", "testbed:ba9876543210"


def _pixel_index(provenance: dict) -> TrainingIndex:
    return TrainingIndex.build(torch.rand(2, 3, 16, 16) * 2 - 1, ["a", "b"],
                               embedder=PixelSpace(size=16), provenance=provenance)


def test_testbed_model_accepts_only_its_own_training_set_and_renderer():
    check_index_matches(_pixel_index({"training_set": MINE}), MINE, "amg")
    for prov in ({}, {"training_set": OTHER}):
        with pytest.raises(ConfigError, match=r"amg: the index holds .* not this testbed model's"):
            check_index_matches(_pixel_index(prov), MINE, "amg")
    rendered = _pixel_index({"training_set": MINE, "rendered_by": "vae:aaa"})
    check_index_matches(rendered, MINE, "amg", renderer="vae:aaa")
    calls = []
    check_index_matches(rendered, MINE, "amg", renderer=lambda: calls.append(1) or "vae:aaa")
    assert calls == [1]
    with pytest.raises(ConfigError, match="rendered by another VAE"):
        check_index_matches(rendered, MINE, "amg", renderer=lambda: "vae:bbb")
    with pytest.raises(ConfigError, match=r"expects a sscd_cosine index .* pass criterion="):
        check_index_matches(rendered, MINE, "amg", criterion="sscd_cosine")


def test_other_models_refuse_a_testbed_index_only():
    with pytest.raises(ConfigError, match="expects a sscd_cosine index but the index measures "
                                          "tiled_l2; pass"):
        check_index_matches(_pixel_index({}), None, "amg")
    check_index_matches(_pixel_index({}), None, "amg", criterion="tiled_l2")
    with pytest.raises(ConfigError, match=r"holds a testbed's training set .* not that testbed"):
        check_index_matches(_pixel_index({"training_set": MINE}), None, "amg",
                            criterion="tiled_l2")
    with pytest.raises(ConfigError, match="holds laion:x, not this model's training set"):
        check_index_matches(_pixel_index({"training_set": "laion:x"}), "laion:y", "amg",
                            criterion="tiled_l2")


def test_model_training_set_comes_from_the_profile(testbed_adapter, tiny_dir):
    from diffmem.models.adapter import load_adapter
    from diffmem.testbed import shipped_testbed_spec
    from diffmem.testbed.index import testbed_fingerprint

    class Profile:
        training_set = "laion:x"

    class Profiled:
        profile = Profile()

    assert model_training_set(testbed_adapter) == testbed_fingerprint(shipped_testbed_spec())
    assert model_training_set(testbed_adapter).startswith("testbed:")
    assert model_training_set(Profiled()) == "laion:x"
    assert model_training_set(load_adapter(tiny_dir)) is None  # a folder without a profile
    assert model_training_set(object()) is None

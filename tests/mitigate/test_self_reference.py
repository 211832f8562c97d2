"""The guard without an index: copies among a prompt's own images, and its own plain images as the
reference (``diffmem.mitigate.self_reference``)."""

from __future__ import annotations

import pytest
import torch

from diffmem.core.sampling import sample, seeded_generators
from diffmem.mitigate.guard import Guard, GuardConfig
from diffmem.mitigate.self_reference import agreement, criterion_of, self_reference_index
from diffmem.models.adapter import load_adapter

STEPS = 4


@pytest.fixture
def adapter(tiny_testbed):
    return load_adapter(tiny_testbed)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1


def test_agreement_compares_the_images_of_one_prompt_only(adapter):
    imgs = _images(4)
    imgs[1] = imgs[0]  # rows 0 and 1: the same image, same prompt
    imgs[3] = imgs[2]  # rows 2 and 3: the same image, other prompts
    found = agreement(adapter, imgs, ["a", "a", "b", "c"])
    assert found.copies.tolist() == [True, True, False, False]
    assert found.nearest[:2] == [1, 0] and found.nearest[2:] == [None, None]
    crit = criterion_of(adapter)
    assert crit.name == "tiled_l2" and crit.is_copy(found.similarity[0])


def test_agreement_of_unrelated_images_is_no_copy(adapter):
    found = agreement(adapter, _images(3, seed=1), ["a", "a", "a"])
    assert not found.copies.any()
    assert all(not criterion_of(adapter).is_copy(s) for s in found.similarity)


def test_the_reference_index_records_the_models_training_set(adapter):
    ref = self_reference_index(adapter, _images(2), ["plain:0", "plain:1"], ["a", "b"])
    assert len(ref) == 2 and ref.provenance["source"] == "own plain generations"
    assert ref.provenance["training_set"] == adapter.profile.training_set
    assert ref.search(_images(2)[:1], k=1).ids[0][0] == "plain:0"


def test_images_of_a_prompt_that_copy_each_other_are_regenerated_and_verified(adapter):
    # the same prompt and seed twice: two identical plain images, copies of each other
    guard = Guard(adapter, threshold=1e9, config=GuardConfig(probe=False))
    prompts, seeds = ["a red circle"] * 2 + ["a cat"], [5, 5, 1]
    out = guard.generate(prompts, seeds, num_inference_steps=STEPS)
    plain = sample(adapter, prompts, generator=seeded_generators(seeds),
                   num_inference_steps=STEPS).images
    assert [v.watch for v in out.verdicts] == ["agreement", "agreement", None]
    for v in out.verdicts[:2]:
        assert v.status in ("mitigated", "unresolved") and v.reference == "own plain images"
        assert not v.verified and v.nearest.startswith("plain:")
    assert out.verdicts[2].status == "clean"
    assert torch.equal(out.images[2], plain[2])  # the unflagged image is plain, bit for bit


def test_a_copy_that_cannot_leave_its_own_image_is_marked_unresolved(adapter):
    config = GuardConfig(probe=False, margin=1e9, max_tries=2, ladder=("ren", "amg+reseed"))
    out = Guard(adapter, threshold=1e9, config=config).generate(
        ["a red circle"] * 2, [5, 5], num_inference_steps=STEPS)
    assert [(v.status, v.tries) for v in out.verdicts] == [("unresolved", 2)] * 2
    assert [t["method"] for t in out.records["timing"]["tries"]] == ["ren", "amg+reseed"]


def test_a_single_image_gets_a_probe_from_another_seed(adapter):
    # probe_offset 0: the probe repeats the image's own seed, so the two are copies
    config = GuardConfig(probe_offset=0, margin=-1.0)
    out = Guard(adapter, threshold=1e9, config=config).generate(
        ["a red circle"], [3], num_inference_steps=STEPS)
    assert out.verdicts[0].watch == "agreement" and out.verdicts[0].status == "mitigated"
    assert out.generations == 3  # the plain image, its probe, one mitigated try
    off = Guard(adapter, threshold=1e9, config=GuardConfig(probe=False)).generate(
        ["a red circle"], [3], num_inference_steps=STEPS)
    assert off.verdicts[0].status == "clean" and off.generations == 1

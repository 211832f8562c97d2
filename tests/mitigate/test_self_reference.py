"""The guard without an index: copies among a prompt's own images, and its own plain images as the
reference (``diffmem.mitigate.self_reference``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.core.sampling import sample, seeded_generators
from diffmem.mitigate.guard import Guard, GuardConfig
from diffmem.mitigate.self_reference import agreement, criterion_of, self_reference_index
from diffmem.models.adapter import load_adapter
from diffmem.runtime.errors import ConfigError

STEPS = 4


@pytest.fixture
def adapter(tiny_testbed):
    return load_adapter(tiny_testbed)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1


def test_agreement_compares_the_images_of_one_prompt_from_other_seeds(adapter):
    imgs = _images(6)
    imgs[1] = imgs[0]  # rows 0 and 1: the same image, same prompt, seeds 0 and 1
    imgs[3] = imgs[2]  # rows 2 and 3: the same image, other prompts
    imgs[5] = imgs[4]  # rows 4 and 5: the same image, same prompt, the same seed
    found = agreement(adapter, imgs, ["a", "a", "b", "c", "d", "d"], [0, 1, 0, 1, 7, 7])
    assert found.copies.tolist() == [True, True, False, False, False, False]
    assert found.nearest[:2] == [1, 0] and found.nearest[2:] == [None] * 4
    crit = criterion_of(adapter)
    assert crit.name == "tiled_l2" and crit.is_copy(found.similarity[0])


def test_agreement_of_unrelated_images_is_no_copy(adapter):
    found = agreement(adapter, _images(3, seed=1), ["a", "a", "a"])
    assert not found.copies.any()
    assert all(not criterion_of(adapter).is_copy(s) for s in found.similarity)


def test_agreement_margin_asks_two_images_to_sit_that_far_inside_the_criterion(adapter):
    imgs = _images(2)
    imgs[1] = imgs[0] * 0.97  # a near twin: a copy by the criterion, at a distance above 0
    found = agreement(adapter, imgs, ["a", "a"], [0, 1])
    inside = criterion_of(adapter).margin(found.similarity[0])
    assert found.copies.all() and 0 < inside < 0.15
    assert agreement(adapter, imgs, ["a", "a"], [0, 1], margin=inside - 1e-6).copies[0]
    assert not agreement(adapter, imgs, ["a", "a"], [0, 1], margin=inside + 1e-6).copies[0]


def test_the_guard_flags_by_agreement_only_inside_its_margin(adapter, everything_copies):
    prompts, seeds = ["a red circle"] * 2, [5, 6]
    kw = {"num_inference_steps": STEPS}
    base = GuardConfig(probe=False, max_tries=1)
    flagged = Guard(adapter, threshold=1e9, config=base).generate(prompts, seeds, **kw)
    assert [v.watch for v in flagged.verdicts] == ["agreement", "agreement"]
    # the loosened criterion puts every pair 1e9 inside it: a margin beyond that flags nothing
    far = Guard(adapter, threshold=1e9, config=GuardConfig(probe=False, max_tries=1,
                                                          agreement_margin=2e9))
    assert [v.status for v in far.generate(prompts, seeds, **kw).verdicts] == ["clean"] * 2
    with pytest.raises(ConfigError, match="agreement_margin"):
        Guard(adapter, threshold=1e9, config=GuardConfig(agreement_margin=-0.1))


@pytest.mark.parametrize("confirm", [True, False])
def test_a_gate_flag_the_comparison_does_not_confirm_is_served_plain(adapter, confirm):
    """Threshold -1: the gate flags every image; the two seeds of the prompt are unrelated
    images (the tiny random model), so the agreement check does not confirm the flags."""
    prompts, seeds = ["a red circle"] * 2, [0, 1]
    config = GuardConfig(probe=False, max_tries=1, confirm_gate=confirm)
    out = Guard(adapter, threshold=-1.0, config=config).generate(prompts, seeds,
                                                                 num_inference_steps=STEPS)
    plain = sample(adapter, prompts, generator=seeded_generators(seeds),
                   num_inference_steps=STEPS).images
    assert [v.watch for v in out.verdicts] == ["gate", "gate"]
    if confirm:
        assert [v.status for v in out.verdicts] == ["clean", "clean"]
        assert all(torch.equal(out.images[i], plain[i]) for i in range(2))
    else:
        assert [v.status for v in out.verdicts] == ["mitigated", "mitigated"]


def test_a_gate_flag_needs_agreement_only_within_the_criterion(adapter, everything_copies):
    # every pair copies by the loosened criterion: a margin beyond it still confirms a gate flag
    config = GuardConfig(probe=False, max_tries=1, agreement_margin=2e9)
    out = Guard(adapter, threshold=-1.0, config=config).generate(
        ["a red circle"] * 2, [0, 1], num_inference_steps=STEPS)
    assert [(v.status, v.watch) for v in out.verdicts] == [("unresolved", "gate")] * 2


def test_the_reference_index_records_the_models_training_set(adapter):
    ref = self_reference_index(adapter, _images(2), ["plain:0", "plain:1"], ["a", "b"])
    assert len(ref) == 2 and ref.provenance["source"] == "own plain generations"
    assert ref.provenance["training_set"] == adapter.profile.training_set
    assert ref.search(_images(2)[:1], k=1).ids[0][0] == "plain:0"


@pytest.fixture
def everything_copies(monkeypatch):
    """The model's copy criterion made so loose that any two images are copies of each other
    (tiled L2 < 1e9): the agreement check flags every prompt with two seeds."""
    import diffmem.mitigate.self_reference as sr

    real = sr.criterion_of
    monkeypatch.setattr(sr, "criterion_of", lambda adapter: real(adapter).at(1e9))


def test_images_of_a_prompt_that_copy_each_other_are_regenerated_and_marked(adapter,
                                                                            everything_copies):
    config = GuardConfig(probe=False, max_tries=2, ladder=("ren", "amg+reseed"))
    guard = Guard(adapter, threshold=1e9, config=config)
    prompts, seeds = ["a red circle"] * 2 + ["a cat"], [5, 6, 1]
    out = guard.generate(prompts, seeds, num_inference_steps=STEPS)
    plain = sample(adapter, prompts, generator=seeded_generators(seeds),
                   num_inference_steps=STEPS).images
    assert [v.watch for v in out.verdicts] == ["agreement", "agreement", None]
    for v in out.verdicts[:2]:  # nothing can leave a criterion this loose: marked
        assert (v.status, v.tries, v.reference, v.verified) == (
            "unresolved", 2, "own plain images", False)
        assert v.nearest.split(":")[0] in ("plain", "served", "tried")
    assert [t["method"] for t in out.records["timing"]["tries"]] == ["ren", "amg+reseed"]
    assert out.verdicts[2].status == "clean"  # one image of its prompt: nothing to compare
    assert torch.equal(out.images[2], plain[2])  # and plain, bit for bit


def test_a_mitigated_image_passes_when_it_leaves_its_own_plain_images(adapter):
    # every image flagged at the first step; margin -1: any distance passes verification
    out = Guard(adapter, threshold=-1.0, config=GuardConfig(probe=False, margin=-1.0)).generate(
        ["a red circle", "a cat"], [0, 1], num_inference_steps=STEPS)
    assert [(v.status, v.watch, v.method, v.tries) for v in out.verdicts] == [
        ("mitigated", "gate", "ren", 1)] * 2
    assert all(v.reference == "own plain images" and v.nearest.startswith("plain:")
               for v in out.verdicts)


def test_a_single_image_gets_a_probe_from_another_seed(adapter, everything_copies):
    config = GuardConfig(max_tries=1)
    out = Guard(adapter, threshold=1e9, config=config).generate(
        ["a red circle"], [3], num_inference_steps=STEPS)
    assert out.verdicts[0].watch == "agreement"
    assert out.generations == 3  # the plain image, its probe, one mitigated try
    off = Guard(adapter, threshold=1e9, config=GuardConfig(probe=False)).generate(
        ["a red circle"], [3], num_inference_steps=STEPS)
    assert off.verdicts[0].status == "clean" and off.generations == 1
    with pytest.raises(ConfigError, match="probe"):
        Guard(adapter, threshold=1e9, config=GuardConfig(probe_offset=0))


def test_given_embeddings_are_compared_by_embedding_not_by_prompt_text(adapter,
                                                                       everything_copies):
    """The recovery check passes the same prompt text with different embeddings: the agreement
    check groups the images of one embedding, never those of two."""
    with torch.no_grad():
        emb = adapter.encode(["a red circle", "a cat"])
    config = GuardConfig(probe=False, max_tries=1)
    guard = Guard(adapter, threshold=1e9, config=config)
    two = guard.generate(["", ""], [0, 1], cond=emb, num_inference_steps=STEPS)
    assert [v.status for v in two.verdicts] == ["clean", "clean"]
    same = guard.generate(["", ""], [0, 1], cond=emb[[0, 0]], num_inference_steps=STEPS)
    assert [v.watch for v in same.verdicts] == ["agreement", "agreement"]


@pytest.fixture
def first_pair_copies(monkeypatch):
    """The agreement check of the plain images finds rows 0 and 1 copies of each other, and
    nothing else; every later check (of mitigated images) finds nothing."""
    import diffmem.mitigate.self_reference as sr

    calls = []

    def fake(adapter, images, prompts, seeds=None, *, margin=0.0):
        n = len(prompts)
        first = not calls
        calls.append(n)
        copies = np.zeros(n, dtype=bool)
        nearest, sims = [None] * n, [None] * n
        if first:
            copies[:2] = True
            nearest[:2], sims[:2] = [1, 0], [0.0, 0.0]
        return sr.Agreement(nearest, sims, copies)

    monkeypatch.setattr(sr, "agreement", fake)
    return calls


@pytest.mark.parametrize("prompt_wide", [True, False])
def test_a_prompt_whose_images_copy_each_other_is_mitigated_whole(adapter, first_pair_copies,
                                                                  prompt_wide):
    """Its third seed copied nothing the check could pair (a lone copy of another memorized
    image looks like that): with ``prompt_wide`` it is regenerated too; the other prompt's images
    stay plain."""
    prompts, seeds = ["a red circle"] * 3 + ["a cat"] * 2, [0, 1, 2, 0, 1]
    config = GuardConfig(probe=False, max_tries=1, prompt_wide=prompt_wide)
    out = Guard(adapter, threshold=1e9, config=config).generate(prompts, seeds,
                                                                num_inference_steps=STEPS)
    plain = sample(adapter, prompts, generator=seeded_generators(seeds),
                   num_inference_steps=STEPS).images
    watches = [v.watch for v in out.verdicts]
    assert watches[:2] == ["agreement", "agreement"] and watches[3:] == [None, None]
    if prompt_wide:
        assert watches[2] == "agreement (prompt)" and out.verdicts[2].status == "mitigated"
        assert not torch.equal(out.images[2], plain[2])
    else:
        assert watches[2] is None and out.verdicts[2].status == "clean"
        assert torch.equal(out.images[2], plain[2])
    assert all(torch.equal(out.images[i], plain[i]) for i in (3, 4))

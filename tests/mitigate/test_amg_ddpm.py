"""AMG on pixel-space DDPMs: unconditional (G_sim) and class-conditional (class guidance, the
neighbour's class, G_sim); only the images it fires on change."""

from __future__ import annotations

import pytest
import torch

from diffmem import load_adapter, sample, seeded_generators
from diffmem.mitigate.amg import AntiMemorizationGuidance
from diffmem.similarity.index import PixelSpace, TrainingIndex

from ..models.test_ddpm_adapter import make_tiny_ddpm


@pytest.fixture(scope="module")
def ddpm_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddpm_amg")
    return {"uncond": make_tiny_ddpm(base / "uncond"),
            "class": make_tiny_ddpm(base / "class", classes=3)}


def _index_of(image: torch.Tensor) -> TrainingIndex:
    """An index whose first item is ``image`` (so the run that made it fires), plus far images."""
    far = torch.stack([torch.full_like(image, v) for v in (-1.0, 1.0)])
    images = torch.cat([image[None], far]).clamp(-1, 1)
    return TrainingIndex.build(images, [["class:1"], ["class:0"], ["class:2"]],
                               ["copy", "black", "white"], PixelSpace(size=8), copies=[50, 1, 1])


@pytest.mark.parametrize("kind", ["uncond", "class"])
def test_amg_changes_only_the_images_it_fires_on(ddpm_dirs, kind):
    adapter = load_adapter(ddpm_dirs[kind])
    prompts = ["class:1", "class:0"] if kind == "class" else ["", ""]
    kw = {"num_inference_steps": 8}
    plain = sample(adapter, prompts, generator=seeded_generators([0, 1]), **kw)
    amg = AntiMemorizationGuidance(index=_index_of(plain.images[0]), adapter=adapter)
    res = sample(adapter, prompts, generator=seeded_generators([0, 1]), hooks=[amg], **kw)
    rec = res.records["mitigation.amg"]
    fired = [r["fired_steps"] > 0 for r in rec]
    assert fired[0], rec
    for i, f in enumerate(fired):
        # an image AMG did not fire on is the plain one (up to the float rounding of a UNet batch
        # that holds the other image's extra null-class rows)
        diff = float((res.latents[i] - plain.latents[i]).abs().max())
        assert (diff > 1e-2) if f else (diff < 1e-4), (i, diff, rec[i])
    r0 = rec[0]
    if kind == "uncond":  # nothing to lower or steer away from: G_sim only
        assert r0["spe_steps"] == 0 and r0["dup_steps"] == 0 and r0["sim_steps"] > 0
        assert r0["dup_caption"] is None
    else:  # class guidance lowered from the step after the first firing; neighbour's class
        assert r0["spe_steps"] > 0 and r0["dup_caption"] == "class:1"

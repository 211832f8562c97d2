"""The pixel testbed (testbed-ddpm, testbed-ddpm-class): data, resumable training into a
DDPMPipeline folder with its profile, the pixel index and labels by generation."""

from __future__ import annotations

import json

import pytest

from diffmem.testbed.ddpm import CLASSES, DDPMSpec, build_ddpm_data, duplicated_copies, train_ddpm

TINY = {"n_generic": 6, "n_duplicated": 2, "channels": "8,8,8", "batch_size": 4,
        "checkpoint_every": 1, "warmup_steps": 1}


def test_data_is_deterministic_with_classes():
    a, b = build_ddpm_data(DDPMSpec(**TINY)), build_ddpm_data(DDPMSpec(**TINY))
    assert a.images.shape == (8, 3, 32, 32) and (a.images == b.images).all()
    assert a.kinds.count("duplicated") == 2 and all(0 <= y < len(CLASSES) for y in a.labels)
    spec = DDPMSpec()  # 8 duplicated images make 40 % of the batches, the generic ones the rest
    share = (spec.duplicated_fraction / spec.n_duplicated) / ((1 - spec.duplicated_fraction)
                                                              / spec.n_generic)
    assert duplicated_copies(spec) == round(share) == 8  # 100 generic images
    assert duplicated_copies(DDPMSpec(n_generic=200)) == 17


@pytest.mark.parametrize("cc", [False, True])
def test_training_resumes_and_writes_a_loadable_pipeline(tmp_path, cc):
    from diffmem import load_adapter, sample, seeded_generators
    from diffmem.testbed.ddpm_eval import build_ddpm_index, label_generations

    spec = DDPMSpec(steps=2, class_conditional=cc, **TINY)
    train_ddpm(tmp_path / "run", spec)
    target = train_ddpm(tmp_path / "run", DDPMSpec(steps=3, class_conditional=cc, **TINY))
    assert json.loads((tmp_path / "run" / "train_log.json").read_text())["steps"] == 3
    adapter = load_adapter(target)
    assert adapter.family == "ddpm" and adapter.class_conditional == cc
    prof = adapter.profile
    assert prof.name == spec.name and prof.criterion == "tiled_l2" and prof.training_set
    prompts = ["class:circle", "class:1"] if cc else ["", ""]
    res = sample(adapter, prompts, num_inference_steps=2, generator=seeded_generators([0, 1]))
    index = build_ddpm_index(spec=spec)
    rows = label_generations(res.images, index, prompts, [0, 1])
    assert len(rows) == 2 and {"copy", "duplicated", "nearest", "distance"} <= set(rows[0])
    from diffmem.similarity.index_compat import check_index_model

    check_index_model(index, adapter, who="test")  # its own pixel index is accepted


def test_ddpm_eval_takes_the_class_guidance_scale(tmp_path, monkeypatch):
    """`testbed ddpm-eval --guidance-scale`: the scale reaches every sampling run (class guidance
    with the null class) and the report says which scale it used."""
    import diffmem.core.sampling as sampling
    from diffmem.cli import main
    from diffmem.testbed.ddpm_eval import build_ddpm_index, measure

    spec = DDPMSpec(steps=2, class_conditional=True, **TINY)
    target = train_ddpm(tmp_path / "run", spec)
    index = build_ddpm_index(spec=spec)
    seen, real = [], sampling.sample

    def spy(*args, **kwargs):
        seen.append(kwargs.get("guidance_scale"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample", spy)
    assert measure(target, index, n=2, steps=2)["guidance_scale"] is None
    assert measure(target, index, n=2, steps=2, guidance_scale=3.0)["guidance_scale"] == 3.0
    assert seen == [None, 3.0]
    assert main(["testbed", "ddpm-eval", str(target), "--images", "2", "--sampling-steps", "2",
                 "--guidance-scale", "2"]) == 0
    assert seen[-1] == 2.0

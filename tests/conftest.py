"""Shared fixtures: tiny random pipelines (built once per test run) and the shipped testbed."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from diffmem.testbed import spec_of

from .fixtures.tiny_models import make_tiny_pipeline

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
# calibrations stored by the tests go to a fresh folder, never the user's cache
os.environ["DIFFMEM_CACHE"] = tempfile.mkdtemp(prefix="diffmem-test-cache-")


@pytest.fixture(autouse=True)
def _own_calibration_cache(tmp_path_factory, monkeypatch):
    """Each test stores calibrations in a folder of its own: a threshold one test calibrated on a
    tiny model must not be found by another (``CalibrationStore.latest``)."""
    monkeypatch.setenv("DIFFMEM_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory):
    from diffmem.testbed.components import write_clip_tokenizer

    base = tmp_path_factory.mktemp("tokenizers")
    return {
        "sd1": write_clip_tokenizer(base / "sd1"),
        "sd2": write_clip_tokenizer(base / "sd2", pad_token="!"),
    }


@pytest.fixture(scope="session")
def tiny_pipe(tokenizer_dirs):
    return make_tiny_pipeline("sd1", tokenizer_dir=tokenizer_dirs["sd1"])


@pytest.fixture(scope="session")
def tiny_pipe_sd2(tokenizer_dirs):
    return make_tiny_pipeline("sd2", prediction_type="v_prediction",
                              tokenizer_dir=tokenizer_dirs["sd2"])


@pytest.fixture(scope="session")
def tiny_dir(tiny_pipe, tmp_path_factory):
    """The tiny SD 1 pipeline saved as a folder."""
    path = tmp_path_factory.mktemp("tiny") / "pipe"
    tiny_pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def testbed_adapter():
    """Adapter of the shipped, trained testbed pipeline."""
    from diffmem.models.adapter import load_adapter

    return load_adapter("testbed")


class UNetCalls:
    """Counts the UNet's forward calls and their batch sizes (``with UNetCalls(unet) as c``)."""

    def __init__(self, unet):
        self.sizes: list[int] = []
        self.handle = unet.register_forward_pre_hook(
            lambda mod, args, kwargs: self.sizes.append(args[0].shape[0]), with_kwargs=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="session")
def tiny_testbed(tiny_dir, tmp_path_factory):
    """The tiny pipeline posing as a testbed trained on a small data spec."""
    import json
    import shutil
    from dataclasses import asdict

    from diffmem.models.adapter import load_adapter
    from diffmem.testbed.data import TestbedSpec

    folder = tmp_path_factory.mktemp("tb") / "pipe"
    shutil.copytree(tiny_dir, folder)
    spec = TestbedSpec(n_generic=20, n_verbatim=2, n_template=1, template_variants=4,
                       template_eval_variants=2, n_heldout_compositions=3,
                       resolution=load_adapter(tiny_dir).default_resolution)
    (folder / "testbed.json").write_text(json.dumps(asdict(spec)))
    from diffmem.testbed.profile import write_testbed_profile

    write_testbed_profile(folder, spec)
    return folder


@pytest.fixture(scope="session")
def tiny_graded_spec(tiny_dir):
    """A small graded data spec (as ``GRADED_SPEC``: duplicate counts 1, 4, 16, 2 items each)."""
    from diffmem.models.adapter import load_adapter
    from diffmem.testbed.data import TestbedSpec

    return TestbedSpec(seed=1, n_generic=10, n_verbatim=0, n_template=0,
                       n_heldout_compositions=3, n_rare_words=300, graded_counts="1,4,16",
                       graded_items_per_count=2,
                       resolution=load_adapter(tiny_dir).default_resolution)


@pytest.fixture(scope="session")
def tiny_graded_testbed(tiny_dir, tiny_graded_spec, tmp_path_factory):
    """The tiny pipeline posing as the graded testbed (``testbed-graded``) of a small graded spec,
    with the files ``diffmem testbed train --graded`` writes beside the weights."""
    import json
    import shutil

    from diffmem.testbed import write_labelled_prompts
    from diffmem.testbed.profile import write_testbed_profile

    folder = tmp_path_factory.mktemp("tbg") / "pipe"
    shutil.copytree(tiny_dir, folder)
    (folder / "testbed.json").write_text(json.dumps(tiny_graded_spec.to_dict()))
    write_labelled_prompts(folder, tiny_graded_spec)
    write_testbed_profile(folder, tiny_graded_spec)
    return folder


@pytest.fixture
def graded_model(tiny_graded_testbed, tmp_path, monkeypatch):
    """A fresh copy of the tiny graded testbed, installed as the named model ``testbed-graded``
    (``MODELS`` points to it for the test); returns its folder."""
    import shutil

    from diffmem.models.profile import MODELS
    from diffmem.runtime.naming import registry_name

    folder = tmp_path / "weights_graded"
    shutil.copytree(tiny_graded_testbed, folder)
    monkeypatch.setitem(MODELS._entries, registry_name("testbed-graded"), folder)
    return folder


@pytest.fixture(scope="session")
def tiny_testbed_index(tiny_testbed, tmp_path_factory):
    """A saved index of the tiny testbed's training images as its VAE renders them."""
    from diffmem.models.adapter import load_adapter
    from diffmem.testbed.index import build_testbed_index

    adapter = load_adapter(tiny_testbed)
    out = tmp_path_factory.mktemp("tbidx") / "idx"
    build_testbed_index(out, spec=spec_of(adapter), rendered_by=adapter)
    return out


@pytest.fixture
def unet_calls():
    """The :class:`UNetCalls` counter class."""
    return UNetCalls


def _split_gate(adapter, prompts, generators, steps):
    """A first-step gate whose threshold splits ``prompts`` in two halves by their noise
    magnitude; returns ``(gate, flagged)``."""
    import numpy as np

    from diffmem.core.sampling import sample
    from diffmem.detect import NoiseMagnitude
    from diffmem.mitigate import FirstStepGate

    det = NoiseMagnitude(steps=1)
    scores = sample(adapter, prompts, num_inference_steps=steps, generator=generators(),
                    hooks=[det], decode=False).records[det.name]
    s = np.sort(scores)
    k = len(s) // 2
    thr = float((s[k - 1] + s[k]) / 2)
    flagged = torch.as_tensor(scores > thr)
    assert 0 < int(flagged.sum()) < len(prompts)
    return FirstStepGate(thr), flagged


@pytest.fixture
def split_gate():
    """``split_gate(adapter, prompts, generators, steps) -> (gate, flagged)``."""
    return _split_gate


@pytest.fixture
def few_broad_prompts(monkeypatch):
    """The broad prompt set cut to its first 4 prompts and 2 clean controls (labelling it then
    takes seconds)."""
    import diffmem.testbed.broad as broad

    real = broad.broad_prompts

    def few(spec=None, testbed=None):
        ps = real(spec, testbed)
        return ps[:4] + [p for p in ps if p.group == "clean"][:2]

    monkeypatch.setattr(broad, "broad_prompts", few)

"""Shared fixtures: tiny random pipelines (built once per test run) and the shipped testbed."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


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
    from diffmem.testbed.tiny import make_tiny_pipeline

    return make_tiny_pipeline("sd1", tokenizer_dir=tokenizer_dirs["sd1"])


@pytest.fixture(scope="session")
def tiny_pipe_sd2(tokenizer_dirs):
    from diffmem.testbed.tiny import make_tiny_pipeline

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

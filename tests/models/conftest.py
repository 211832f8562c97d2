"""The tiny random SDXL folder shared by the SDXL tests (built once per test run)."""

from __future__ import annotations

import pytest

from diffmem.models.adapter import load_adapter

from ..fixtures.tiny_models import make_tiny_sdxl_pipeline


@pytest.fixture(scope="session")
def sdxl_dir(tokenizer_dirs, tmp_path_factory):
    pipe = make_tiny_sdxl_pipeline(tokenizer_dir=tokenizer_dirs["sd1"],
                                   tokenizer_2_dir=tokenizer_dirs["sd2"])
    path = tmp_path_factory.mktemp("sdxl") / "pipe"
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sdxl(sdxl_dir):
    return load_adapter(sdxl_dir)

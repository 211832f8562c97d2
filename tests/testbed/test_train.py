"""Testbed training: runs, checkpoints, resumes exactly, refuses a mismatched run folder."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from diffmem.runtime.errors import ConfigError
from diffmem.testbed.data import TestbedSpec
from diffmem.testbed.train import TrainConfig, train_testbed

SPEC = TestbedSpec(n_generic=16, n_verbatim=2, n_template=1, template_variants=3,
                   template_eval_variants=2, n_heldout_compositions=2)


def _cfg(unet_steps: int) -> TrainConfig:
    return TrainConfig(vae_steps=2, vae_batch_size=4, unet_steps=unet_steps, batch_size=4,
                       decoder_steps=2, checkpoint_every=1)


def _unet(run) -> dict:
    return load_file(next((run / "pipeline" / "unet").glob("*.safetensors")))


@pytest.mark.filterwarnings("ignore")
def test_train_resume_matches_uninterrupted_run(tmp_path):
    straight = train_testbed(tmp_path / "a", _cfg(3), SPEC)
    train_testbed(tmp_path / "b", _cfg(1), SPEC)  # "interrupted" after 1 step ...
    resumed = train_testbed(tmp_path / "b", _cfg(3), SPEC)  # ... and resumed to 3
    a, b = _unet(tmp_path / "a"), _unet(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    pipe = StableDiffusionPipeline.from_pretrained(straight)
    img = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 64, 64, 3)
    assert json.loads((resumed / "testbed.json").read_text())["n_generic"] == 16
    with pytest.raises(ConfigError, match="other settings"):
        train_testbed(tmp_path / "b", TrainConfig(vae_steps=2, unet_steps=3, decoder_steps=2,
                                                  lr=1.0), SPEC)

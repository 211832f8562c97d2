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


@pytest.mark.filterwarnings("ignore")
def test_continue_from_an_installed_pipeline(tmp_path):
    """A run folder seeded from a pipeline (its run folder gone) trains the UNet on from the
    pipeline's weights, keeps its VAE (the latent space), resumes, refuses what does not fit."""
    from diffmem.testbed.continue_run import seed_run_from_pipeline

    shipped = train_testbed(tmp_path / "a", _cfg(2), SPEC)
    seed_run_from_pipeline(tmp_path / "c", shipped, _cfg(3), SPEC, done_steps=2)
    state = torch.load(tmp_path / "c" / "state" / "unet_state.pt", weights_only=False)
    assert state["step"] == 2
    for k, v in _unet(tmp_path / "a").items():  # the UNet starts from the pipeline's weights
        torch.testing.assert_close(state["unet"][k], v, msg=k)
    cont = train_testbed(tmp_path / "c", _cfg(3), SPEC)
    vae_a = load_file(next((shipped / "vae").glob("*.safetensors")))
    vae_c = load_file(next((cont / "vae").glob("*.safetensors")))
    for k in vae_a:  # VAE and decoder as shipped: the index's renderings still hold
        assert torch.equal(vae_a[k], vae_c[k]), k
    assert any(not torch.equal(v, _unet(tmp_path / "c")[k]) for k, v in _unet(tmp_path / "a").items())
    with pytest.raises(ConfigError, match="already holds a run"):
        seed_run_from_pipeline(tmp_path / "c", shipped, _cfg(4), SPEC, done_steps=2)
    with pytest.raises(ConfigError, match="must be above"):
        seed_run_from_pipeline(tmp_path / "d", shipped, _cfg(2), SPEC, done_steps=2)
    other = TestbedSpec(n_generic=17, n_verbatim=2, n_template=1, template_variants=3,
                        template_eval_variants=2, n_heldout_compositions=2)
    with pytest.raises(ConfigError, match="another data spec"):
        seed_run_from_pipeline(tmp_path / "e", shipped, _cfg(3), other, done_steps=2)

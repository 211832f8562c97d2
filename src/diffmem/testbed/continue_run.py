"""Continue training an installed testbed whose run folder is gone
(``diffmem testbed train [--graded] --continue-installed --out DIR --unet-steps N``).

:func:`seed_run_from_pipeline` writes the checkpoints :func:`diffmem.testbed.train.train_testbed`
resumes from, taken from an installed pipeline: the VAE (its encoder, hence the latent space the
UNet was trained in, as trained; its refined decoder) and the decoder stage as finished, and the
UNet + text encoder at ``done_steps`` (the steps the installed weights were trained for: the
defaults of :class:`~diffmem.testbed.train.TrainConfig` / ``GRADED_TRAIN`` reproduce them). The
optimizer starts afresh (its moments are not shipped) and the batches are not those an
uninterrupted run would have drawn; everything else is the ordinary resumable run.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from diffmem.runtime.errors import ConfigError


def seed_run_from_pipeline(out: str | Path, pipeline: str | Path, cfg, spec,
                           done_steps: int) -> Path:
    """Write ``out/state`` and ``out/train_config.json`` from ``pipeline`` (see module); refuses
    a folder that already holds a run, a pipeline of another data spec, and ``cfg.unet_steps``
    not above ``done_steps``."""
    from diffusers import StableDiffusionPipeline

    out, pipeline = Path(out), Path(pipeline)
    state = out / "state"
    if (out / "train_config.json").exists() or (state / "unet_state.pt").exists():
        raise ConfigError(f"{out} already holds a run; resume it without --continue-installed")
    if cfg.unet_steps <= done_steps:
        raise ConfigError(f"--unet-steps {cfg.unet_steps} must be above the {done_steps} steps "
                          "the installed weights were trained for")
    shipped = json.loads((pipeline / "testbed.json").read_text())
    if shipped != spec.to_dict():
        raise ConfigError(f"{pipeline} was trained on another data spec than this run's")
    pipe = StableDiffusionPipeline.from_pretrained(pipeline, safety_checker=None)
    state.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator()

    def fresh(params) -> dict:
        return torch.optim.AdamW(params).state_dict()

    vae = pipe.vae
    decoder = torch.nn.ModuleList([vae.decoder, vae.post_quant_conv])
    _save({"model": vae.state_dict(), "opt": fresh(vae.parameters()), "step": cfg.vae_steps,
           "gen": gen.manual_seed(cfg.seed + 1).get_state()}, state / "vae_state.pt")
    _save({"model": decoder.state_dict(), "opt": fresh(decoder.parameters()),
           "step": cfg.decoder_steps, "gen": gen.manual_seed(cfg.seed + 3).get_state()},
          state / "decoder_state.pt")
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    _save({"unet": pipe.unet.state_dict(), "text_encoder": pipe.text_encoder.state_dict(),
           "opt": fresh(params), "step": done_steps}, state / "unet_state.pt")
    (out / "continued_from.json").write_text(json.dumps(
        {"pipeline": str(pipeline), "unet_steps_done": done_steps,
         "train": asdict(cfg)}, indent=2))
    return out


def _save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)

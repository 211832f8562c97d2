"""``diffmem train``: fine-tune the UNet (optionally the text encoder) of an SD 1.x/2.x pipeline.

One loop for every model: :class:`~diffmem.core.training.DiffusionStep` computes the loss (the
testbed trainer uses the same step), :func:`~diffmem.core.training.optimizer_step` updates. Built on
``accelerate``: on one machine it runs on the GPU when there is one (else the CPU); on several
GPUs, ``accelerate launch -m diffmem.cli train ...`` runs one process per GPU, each drawing its
own batches (seed + process index), with gradients averaged by accelerate and only the main
process writing checkpoints and the pipeline.

Run folder ``OUT``:

- ``train_config.json``: model, data and every option; a rerun with other options is refused
  (only ``steps`` may grow), so rerunning the same command resumes;
- ``state/checkpoint.pt``: every ``checkpoint_every`` steps (atomic write): UNet (and text encoder),
  optimizer, EMA weights, step, and the random generators of data order, captions and noise, so a
  resumed run continues exactly where an uninterrupted one would be (a SIGKILL loses at most one
  checkpoint interval);
- ``train_log.jsonl``: one JSON line every ``log_every`` steps (loss, learning rate, samples kept by
  the loss filters, filter scores, seconds); ``train_log.json``: the summary at the end;
- ``skipped.json``: unreadable images and rows without a caption; ``dedup.json``: near-duplicate
  groups (with ``dedup``);
- ``pipeline/``: the fine-tuned pipeline (EMA weights when ``ema_decay`` > 0), loadable with
  ``StableDiffusionPipeline.from_pretrained``; ``pipeline/diffmem_train.json`` records how.

Latents: every image is encoded once before training (the VAE posterior's mean and standard
deviation, scaled by the VAE's ``scaling_factor``); each step samples ``x_0`` from them. This
keeps the VAE out of the loop (it is frozen) at the cost of ``2 x latent size`` floats per image in
memory (32 KB per 512-px image): meant for fine-tuning sets of up to some 10^5 images.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from diffmem.core.training import DiffusionStep, draw_noise, optimizer_step
from diffmem.runtime.errors import ConfigError
from diffmem.train.captions import CaptionSampler
from diffmem.train.checkpoint import (
    CHECKPOINT,
    EMA,
    _check_out,
    _settings,
    _write_run_files,
    load_config,
    restore_run_state,
    save_run_state,
)
from diffmem.train.config import FinetuneConfig


def resolve_model(model: str | Path) -> Path:
    """The pipeline folder of ``model`` (a named one, "testbed" or "testbed-graded": the shipped
    folder); one clear error otherwise."""
    from diffmem.models.profile import named_model
    from diffmem.runtime.errors import ModelLoadError

    path = named_model(str(model)) or Path(model)
    if not path.is_dir():
        raise ModelLoadError(f"model folder {path} not found (a diffusers pipeline folder or "
                             "'testbed')")
    if not (path / "model_index.json").is_file() or not (path / "unet").is_dir():
        raise ModelLoadError(f"{path} is not a Stable Diffusion pipeline folder (no "
                             "model_index.json / unet/)")
    return path


def _lr_at(step: int, cfg: FinetuneConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":  # depends on `steps`: resume with the same steps to match
        done = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
    return cfg.lr


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, device, batch: int = 32
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled VAE posterior mean and std of every image (on the CPU)."""
    scale = float(vae.config.scaling_factor)
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i : i + batch].to(device, vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu() * scale)
        stds.append(dist.std.float().cpu() * scale)
    return torch.cat(means), torch.cat(stds)


def _tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def finetune(model: str | Path, data: str | Path, out: str | Path,
             cfg: FinetuneConfig | None = None, *, progress: bool = True) -> Path:
    """Fine-tune ``model`` on ``data`` into ``out`` (module docstring); returns ``out/pipeline``.

    Rerunning with the same arguments resumes from the last checkpoint (or, after the end, just
    rewrites the pipeline folder).
    """
    from diffmem.models.adapter import load_pipeline

    cfg = cfg or FinetuneConfig()
    t_start = time.time()
    model_dir = resolve_model(model)
    out = Path(out)
    settings = _settings(model_dir, data, cfg)
    resuming = _check_out(out, settings)
    pipe = load_pipeline(model_dir)
    dataset, t_dedup = _prepare_data(pipe, data, cfg)
    accelerator = _accelerator(cfg)
    if accelerator.is_main_process:
        _write_run_files(out, settings, dataset, cfg, resuming=resuming)
    accelerator.wait_for_everyone()

    run = _Run(pipe, dataset, cfg, accelerator, out)
    run.restore()
    run.prepare()
    run.train(progress)
    accelerator.wait_for_everyone()
    target = out / "pipeline"
    if accelerator.is_main_process:
        run.save_pipeline(target, model_dir, data)
        summary = run.summary()
        summary.update(seconds_dedup_this_run=round(t_dedup, 2),
                       seconds_this_run=round(time.time() - t_start, 1),
                       device=str(accelerator.device), processes=accelerator.num_processes,
                       threads=torch.get_num_threads(), mixed_precision=cfg.mixed_precision)
        (out / "train_log.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return target


def _prepare_data(pipe, data: str | Path, cfg: FinetuneConfig):
    """The training set at the pipeline's resolution (deduplicated with ``cfg.dedup``) and the
    seconds the deduplication took."""
    from diffmem.train.data import deduplicate, load_dataset

    resolution = (int(pipe.unet.config.sample_size)
                  * 2 ** (len(pipe.vae.config.block_out_channels) - 1))
    dataset = load_dataset(data, resolution, image_column=cfg.image_column,
                           caption_column=cfg.caption_column, id_column=cfg.id_column)
    t_dedup = time.time()
    if cfg.dedup:
        dataset = deduplicate(dataset, criterion=cfg.dedup, threshold=cfg.dedup_threshold,
                              keep=cfg.dedup_keep)
    return dataset, time.time() - t_dedup


def _accelerator(cfg: FinetuneConfig):
    from accelerate import Accelerator

    try:
        return Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"mixed precision {cfg.mixed_precision!r} is not available here: "
                          f"{exc}") from exc


def _make_filters(cfg: FinetuneConfig) -> tuple[list, object]:
    """The loss filters of ``cfg`` in their fixed order, and the caption screen (or None)."""
    filters = []
    if cfg.magnitude_filter is not None:
        from diffmem.train.filters import MagnitudeFilter

        filters.append(MagnitudeFilter(cfg.magnitude_filter))
    if cfg.entropy_filter is not None:
        from diffmem.train.filters import EntropyFilter

        filters.append(EntropyFilter(cfg.entropy_filter, direction=cfg.entropy_direction,
                                     layers=cfg.entropy_layers))
    if cfg.loss_filter is not None:
        from diffmem.train.filters import LossFilter

        filters.append(LossFilter(cfg.loss_filter))
    screen = None
    if cfg.screen_captions is not None:
        from diffmem.train.filters import CaptionScreen

        screen = CaptionScreen(None if cfg.screen_captions == "auto" else cfg.screen_captions,
                               relative=not cfg.screen_absolute, every=cfg.screen_every,
                               generations=cfg.screen_generations, seed=cfg.seed)
        filters.append(screen)
    return filters, screen


class _Run:
    """One run's state (models, optimizer, EMA, loss filters, random generators, counters) and its
    steps: :meth:`restore` the checkpoint, :meth:`prepare` for accelerate, :meth:`train`,
    :meth:`save_pipeline` and :meth:`summary`."""

    def __init__(self, pipe, dataset, cfg: FinetuneConfig, accelerator, out: Path) -> None:
        self.pipe, self.dataset, self.cfg, self.accelerator = pipe, dataset, cfg, accelerator
        self.device, self.main = accelerator.device, accelerator.is_main_process
        self.ckpt = out / "state" / CHECKPOINT
        self.screen_log = out / "screen.jsonl"
        self.log_path = out / "train_log.jsonl"
        self.unet, self.text_encoder, self.tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
        pipe.vae.to(self.device).eval().requires_grad_(False)
        self.lat_mean, self.lat_std = encode_latents(pipe.vae, dataset.images(), self.device)
        self.captions = [it.captions for it in dataset.items]
        self.sampler = CaptionSampler(cfg.augment, self.tokenizer)
        self.filters, self.screen = _make_filters(cfg)
        # the captions the sampler can draw (MC: every caption of an image, else its first)
        self.all_captions = [c for caps_i in self.captions
                             for c in (caps_i if cfg.augment.mc else caps_i[:1])]
        self.step_fn = DiffusionStep(pipe.scheduler, filters=self.filters, embedding_noise=cfg.gn)

        self.text_encoder.requires_grad_(cfg.train_text_encoder)
        self.unet.requires_grad_(True)
        self.params = list(self.unet.parameters()) + (
            list(self.text_encoder.parameters()) if cfg.train_text_encoder else [])
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.ema = EMA(self.params, cfg.ema_decay) if cfg.ema_decay else None
        self.rank = accelerator.process_index
        self.rng = np.random.default_rng([cfg.seed, self.rank, 1000])
        self.gen = torch.Generator().manual_seed(cfg.seed * 1009 + self.rank + 2000)
        self.step, self.elapsed = 0, 0.0
        self.counters = {"samples": 0, "dropped": {f.name: 0 for f in self.filters}}
        self.resumed_from = 0
        self.t_loop = time.time()  # set again when the loop starts

    # ------------------------------------------------------------------------- checkpoint

    def restore(self) -> None:
        """Continue from the checkpoint, if any; drop the screenings logged after it."""
        restore_run_state(self)

    def save_checkpoint(self) -> None:
        """Write the checkpoint (:func:`diffmem.train.checkpoint.save_run_state`)."""
        save_run_state(self)

    # ------------------------------------------------------------------------- the loop

    def prepare(self) -> None:
        """Wrap the trained modules and the optimizer for accelerate; set train/eval modes."""
        self.text_encoder.to(self.device)
        if self.cfg.train_text_encoder:
            self.unet, self.text_encoder, self.opt = self.accelerator.prepare(
                self.unet, self.text_encoder, self.opt)
            self.text_encoder.train()
        else:
            self.unet, self.opt = self.accelerator.prepare(self.unet, self.opt)
            self.text_encoder.eval()
        self.unet.train()
        self.unet_eval = self.accelerator.unwrap_model(self.unet)
        self.uncond_ids = _tokenize(self.tokenizer, [""]).to(self.device)

    def train(self, progress: bool) -> None:
        """Steps until ``cfg.steps``, logging every ``log_every`` and checkpointing every
        ``checkpoint_every`` steps (and at the end)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step",
                   disable=not (progress and self.main))
        self.t_loop = time.time()
        window: list[float] = []
        while self.step < cfg.steps:
            res = self._train_step()
            loss = float(res.loss.detach())
            window.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", kept=f"{int(res.keep.sum())}/{len(res.keep)}")
            if self.main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                self._log(res, window)
                window = []
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
        bar.close()
        self.elapsed += time.time() - self.t_loop

    def _train_step(self):
        """One optimizer step on a random batch; returns the step's result."""
        cfg, device = self.cfg, self.device
        for g in self.opt.param_groups:
            g["lr"] = _lr_at(self.step, cfg)
        idx = self.rng.integers(len(self.dataset.items), size=cfg.batch_size)
        caps = [self.sampler.draw(self.rng, self.captions[int(i)]) for i in idx]
        idx_t = torch.from_numpy(idx)
        z0, noise, t = draw_noise(self.lat_mean[idx_t], self.lat_std[idx_t], self.gen,
                                  self.step_fn.num_train_timesteps)
        z0, noise, t = z0.to(device), noise.to(device), t.to(device)
        ids = _tokenize(self.tokenizer, caps).to(device)
        with torch.set_grad_enabled(cfg.train_text_encoder):
            emb = self.text_encoder(ids)[0]
        if self.screen is not None and self.screen.due(self.step):
            self._screen_captions()
        context = {"unet_eval": self.unet_eval, "captions": caps}  # the captions as drawn
        if cfg.magnitude_filter is not None:
            with torch.no_grad():
                context["uncond"] = self.text_encoder(self.uncond_ids)[0]
        with self.accelerator.autocast():
            res = self.step_fn(self.unet, z0, noise, t, emb, gen=self.gen, context=context)
        optimizer_step(self.accelerator, res.loss, self.opt, self.params,
                       max_grad_norm=cfg.max_grad_norm)
        if self.ema is not None:
            self.ema.update(self.params)
        self.step += 1
        counters = self.counters
        counters["samples"] += int(res.keep.numel())
        counters["samples_dropped"] = counters.get("samples_dropped", 0) + int((~res.keep).sum())
        for name, d in res.drops.items():
            counters["dropped"][name] = counters["dropped"].get(name, 0) + int(d.sum())
        return res

    def _screen_captions(self) -> None:
        """Screen every caption with the model being trained (in eval mode), log the flagged."""
        screen, step = self.screen, self.step
        was = self.unet_eval.training, self.text_encoder.training
        self.unet_eval.eval()
        self.text_encoder.eval()
        hit = screen.screen(self.pipe, self.all_captions)  # pipe holds the modules being trained
        self.unet_eval.train(was[0])
        self.text_encoder.train(was[1])
        self.counters.setdefault("screenings", []).append(
            {"step": step, "flagged": len(hit), "threshold": screen.threshold,
             "captions": sorted(hit)[:20]})
        if self.main:  # every flagged caption with its score (ratio to the median when relative)
            with self.screen_log.open("a") as f:
                f.write(json.dumps({"step": step, "threshold": screen.threshold,
                                    "flagged": dict(sorted(hit.items()))}) + "\n")

    def _log(self, res, window: list[float]) -> None:
        """One line of ``train_log.jsonl``: mean loss over ``window``, learning rate, kept
        samples, filter scores, seconds."""
        rec = {"step": self.step, "loss": round(float(np.mean(window)), 6),
               "lr": self.opt.param_groups[0]["lr"], "kept": int(res.keep.sum()),
               "batch": len(res.keep),
               "seconds": round(self.elapsed + time.time() - self.t_loop, 2)}
        for name, s in res.scores.items():
            rec[name] = [round(float(v), 4) for v in s]
        with self.log_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------------- outputs

    def save_pipeline(self, target: Path, model_dir: Path, data: str | Path) -> None:
        """The fine-tuned pipeline (EMA weights when there are) and ``diffmem_train.json``."""
        cfg, pipe = self.cfg, self.pipe
        unet_final = self.accelerator.unwrap_model(self.unet)
        te_final = self.accelerator.unwrap_model(self.text_encoder)
        if self.ema is not None:
            self.ema.copy_to(list(unet_final.parameters()) + (list(te_final.parameters())
                                                              if cfg.train_text_encoder else []))
        pipe.unet, pipe.text_encoder = unet_final.eval(), te_final.eval()
        pipe.to("cpu")
        pipe.save_pretrained(target, safe_serialization=True)
        record = {"base_model": str(model_dir), "data": str(data), "steps": cfg.steps,
                  "mitigations": cfg.mitigations(), "train": asdict(cfg)}
        (target / "diffmem_train.json").write_text(json.dumps(record, indent=2))

    def summary(self) -> dict:
        """``train_log.json`` but the timings and the machine (:func:`finetune` adds them)."""
        cfg, dataset, counters = self.cfg, self.dataset, self.counters
        return {
            "steps": cfg.steps, "resumed_from": self.resumed_from, "images": len(dataset.items),
            "skipped": len(dataset.skipped), "dedup_dropped": dataset.dropped,
            "dedup_groups": len(dataset.groups), "mitigations": cfg.mitigations(),
            "samples": counters["samples"],
            "samples_dropped": counters.get("samples_dropped", 0),
            "dropped_by_filter": counters["dropped"],
            "screenings": counters.get("screenings", []),
            "filter_reports": {f.name: f.report() for f in self.filters if hasattr(f, "report")},
            "seconds_training": round(self.elapsed, 1)}


__all__ = ["EMA", "FinetuneConfig", "encode_latents", "finetune", "load_config",
           "resolve_model"]

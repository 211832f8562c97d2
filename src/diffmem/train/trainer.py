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
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from diffmem.core.training import DiffusionStep, draw_noise, optimizer_step
from diffmem.runtime.errors import ConfigError
from diffmem.train.captions import CaptionSampler
from diffmem.train.config import FinetuneConfig

CHECKPOINT = "checkpoint.pt"


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def resolve_model(model: str | Path) -> Path:
    """The pipeline folder of ``model`` ("testbed" = the shipped one); one clear error otherwise."""
    from diffmem.runtime.errors import ModelLoadError

    if str(model) == "testbed":
        from diffmem.testbed import testbed_path

        return testbed_path()
    path = Path(model)
    if not path.is_dir():
        raise ModelLoadError(f"model folder {path} not found (a diffusers pipeline folder or "
                             "'testbed')")
    if not (path / "model_index.json").is_file() or not (path / "unet").is_dir():
        raise ModelLoadError(f"{path} is not a Stable Diffusion pipeline folder (no "
                             "model_index.json / unet/)")
    return path


def _settings(model: Path, data: str | Path, cfg: FinetuneConfig) -> dict:
    return {"model": str(Path(model).resolve()), "data": str(Path(data).resolve()),
            "train": asdict(cfg)}


def _check_out(out: Path, settings: dict) -> bool:
    """Whether ``out`` holds this run (resume); refuses a folder holding anything else."""
    f = out / "train_config.json"
    if f.is_file():
        try:
            old = json.loads(f.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{out} holds an unreadable train_config.json") from exc
        a = {k: v for k, v in old.get("train", {}).items() if k != "steps"}
        b = {k: v for k, v in settings["train"].items() if k != "steps"}
        if a != b or old.get("model") != settings["model"] or old.get("data") != settings["data"]:
            raise ConfigError(f"{out} holds another run ({f}); rerun that run's command to resume "
                              "it or train into a new folder")
        return True
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and holds no diffmem train run; choose an empty or new "
                          "output folder")
    return False


class EMA:
    """Exponential moving average of parameters: ``e <- decay * e + (1 - decay) * p`` per step."""

    def __init__(self, params, decay: float) -> None:
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in params]

    @torch.no_grad()
    def update(self, params) -> None:
        for e, p in zip(self.shadow, params, strict=True):
            e.mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    @torch.no_grad()
    def copy_to(self, params) -> None:
        for e, p in zip(self.shadow, params, strict=True):
            p.copy_(e.to(p.dtype))


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
    from accelerate import Accelerator

    from diffmem.models.adapter import load_pipeline
    from diffmem.train.data import deduplicate, load_dataset

    cfg = cfg or FinetuneConfig()
    t_start = time.time()
    model_dir = resolve_model(model)
    out = Path(out)
    settings = _settings(model_dir, data, cfg)
    resuming = _check_out(out, settings)
    pipe = load_pipeline(model_dir)
    vae, unet, text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
    resolution = int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    dataset = load_dataset(data, resolution, image_column=cfg.image_column,
                           caption_column=cfg.caption_column, id_column=cfg.id_column)
    t_dedup = time.time()
    if cfg.dedup:
        dataset = deduplicate(dataset, criterion=cfg.dedup, threshold=cfg.dedup_threshold,
                              keep=cfg.dedup_keep)
    t_dedup = time.time() - t_dedup
    try:
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                                  cpu=not torch.cuda.is_available())
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"mixed precision {cfg.mixed_precision!r} is not available here: "
                          f"{exc}") from exc
    device, main = accelerator.device, accelerator.is_main_process
    state_dir = out / "state"
    if main:
        state_dir.mkdir(parents=True, exist_ok=True)
        if not resuming:
            (out / "train_config.json").write_text(json.dumps(settings, indent=2))
        (out / "skipped.json").write_text(json.dumps(dataset.skipped, indent=2))
        if cfg.dedup:
            (out / "dedup.json").write_text(json.dumps(
                {"criterion": cfg.dedup, "threshold": cfg.dedup_threshold, "keep": cfg.dedup_keep,
                 "groups": len(dataset.groups), "dropped": dataset.dropped,
                 "kept_items": len(dataset.items), "group_list": dataset.groups}, indent=2))
    accelerator.wait_for_everyone()

    vae.to(device).eval().requires_grad_(False)
    lat_mean, lat_std = encode_latents(vae, dataset.images(), device)
    captions = [it.captions for it in dataset.items]
    sampler = CaptionSampler(cfg.augment, tokenizer)
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
    # the captions the sampler can draw (MC: every caption of an image, else its first)
    all_captions = [c for caps_i in captions for c in (caps_i if cfg.augment.mc else caps_i[:1])]
    step_fn = DiffusionStep(pipe.scheduler, filters=filters, embedding_noise=cfg.gn)

    text_encoder.requires_grad_(cfg.train_text_encoder)
    unet.requires_grad_(True)
    params = list(unet.parameters()) + (list(text_encoder.parameters())
                                        if cfg.train_text_encoder else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(params, cfg.ema_decay) if cfg.ema_decay else None
    rank = accelerator.process_index
    rng = np.random.default_rng([cfg.seed, rank, 1000])
    gen = torch.Generator().manual_seed(cfg.seed * 1009 + rank + 2000)
    step, elapsed, counters = 0, 0.0, {"samples": 0, "dropped": {f.name: 0 for f in filters}}
    ckpt = state_dir / CHECKPOINT
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        unet.load_state_dict(state["unet"])
        if cfg.train_text_encoder:
            text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        if ema is not None:
            ema.shadow = [s.clone() for s in state["ema"]]
        step, elapsed, counters = int(state["step"]), float(state["elapsed"]), state["counters"]
        for f, f_state in zip(filters, state.get("filter_state") or [], strict=False):
            if f_state is not None and hasattr(f, "load_state_dict"):
                f.load_state_dict(f_state)
        if screen is not None:
            screen.flagged = set(state.get("screen_flagged") or ())
            screen.threshold = state.get("screen_threshold", screen.threshold)
        rng_state = state["rng"][rank] if rank < len(state["rng"]) else None
        if rng_state is not None:
            rng.bit_generator.state = rng_state[0]
            gen.set_state(rng_state[1])
    resumed_from = step
    screen_log = out / "screen.jsonl"
    if screen is not None and main and screen_log.exists():  # drop screenings after the checkpoint
        kept = [line for line in screen_log.read_text().splitlines()
                if line and json.loads(line)["step"] < step]
        screen_log.write_text("".join(x + "\n" for x in kept))
    text_encoder.to(device)
    if cfg.train_text_encoder:
        unet, text_encoder, opt = accelerator.prepare(unet, text_encoder, opt)
        text_encoder.train()
    else:
        unet, opt = accelerator.prepare(unet, opt)
        text_encoder.eval()
    unet.train()
    unet_eval = accelerator.unwrap_model(unet)
    uncond_ids = _tokenize(tokenizer, [""]).to(device)

    def save_checkpoint() -> None:
        rngs = [(rng.bit_generator.state, gen.get_state())]
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rngs = gather_object(rngs)
        if main:
            _atomic_save({
                "unet": accelerator.unwrap_model(unet).state_dict(),
                "text_encoder": (accelerator.unwrap_model(text_encoder).state_dict()
                                 if cfg.train_text_encoder else None),
                "opt": opt.state_dict(), "ema": ema.shadow if ema is not None else None,
                "step": step, "elapsed": elapsed + (time.time() - t_loop), "counters": counters,
                "rng": rngs,
                "filter_state": [f.state_dict() if hasattr(f, "state_dict") else None
                                 for f in filters],
                "screen_flagged": sorted(screen.flagged) if screen is not None else None,
                "screen_threshold": screen.threshold if screen is not None else None}, ckpt)

    from tqdm.auto import tqdm

    log_path = out / "train_log.jsonl"
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step",
               disable=not (progress and main))
    t_loop = time.time()
    window: list[float] = []
    while step < cfg.steps:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        idx = rng.integers(len(dataset.items), size=cfg.batch_size)
        caps = [sampler.draw(rng, captions[int(i)]) for i in idx]
        idx_t = torch.from_numpy(idx)
        z0, noise, t = draw_noise(lat_mean[idx_t], lat_std[idx_t], gen,
                                  step_fn.num_train_timesteps)
        z0, noise, t = z0.to(device), noise.to(device), t.to(device)
        ids = _tokenize(tokenizer, caps).to(device)
        with torch.set_grad_enabled(cfg.train_text_encoder):
            emb = text_encoder(ids)[0]
        if screen is not None and screen.due(step):
            was = unet_eval.training, text_encoder.training
            unet_eval.eval()
            text_encoder.eval()
            hit = screen.screen(pipe, all_captions)  # pipe holds the modules being trained
            unet_eval.train(was[0])
            text_encoder.train(was[1])
            counters.setdefault("screenings", []).append(
                {"step": step, "flagged": len(hit), "threshold": screen.threshold,
                 "captions": sorted(hit)[:20]})
            if main:  # every flagged caption with its score (ratio to the median when relative)
                with screen_log.open("a") as f:
                    f.write(json.dumps({"step": step, "threshold": screen.threshold,
                                        "flagged": dict(sorted(hit.items()))}) + "\n")
        context = {"unet_eval": unet_eval, "captions": caps}  # the captions as drawn
        if cfg.magnitude_filter is not None:
            with torch.no_grad():
                context["uncond"] = text_encoder(uncond_ids)[0]
        with accelerator.autocast():
            res = step_fn(unet, z0, noise, t, emb, gen=gen, context=context)
        optimizer_step(accelerator, res.loss, opt, params, max_grad_norm=cfg.max_grad_norm)
        if ema is not None:
            ema.update(params)
        step += 1
        counters["samples"] += int(res.keep.numel())
        counters["samples_dropped"] = counters.get("samples_dropped", 0) + int((~res.keep).sum())
        for name, d in res.drops.items():
            counters["dropped"][name] = counters["dropped"].get(name, 0) + int(d.sum())
        loss = float(res.loss.detach())
        window.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", kept=f"{int(res.keep.sum())}/{len(res.keep)}")
        if main and (step % cfg.log_every == 0 or step == cfg.steps):
            rec = {"step": step, "loss": round(float(np.mean(window)), 6),
                   "lr": opt.param_groups[0]["lr"], "kept": int(res.keep.sum()),
                   "batch": len(res.keep),
                   "seconds": round(elapsed + time.time() - t_loop, 2)}
            for name, s in res.scores.items():
                rec[name] = [round(float(v), 4) for v in s]
            with log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            window = []
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint()
    bar.close()
    elapsed += time.time() - t_loop
    accelerator.wait_for_everyone()
    target = out / "pipeline"
    if main:
        unet_final = accelerator.unwrap_model(unet)
        te_final = accelerator.unwrap_model(text_encoder)
        if ema is not None:
            ema.copy_to(list(unet_final.parameters()) + (list(te_final.parameters())
                                                         if cfg.train_text_encoder else []))
        pipe.unet, pipe.text_encoder = unet_final.eval(), te_final.eval()
        pipe.to("cpu")
        pipe.save_pretrained(target, safe_serialization=True)
        record = {"base_model": str(model_dir), "data": str(data), "steps": cfg.steps,
                  "mitigations": cfg.mitigations(), "train": asdict(cfg)}
        (target / "diffmem_train.json").write_text(json.dumps(record, indent=2))
        summary = {
            "steps": cfg.steps, "resumed_from": resumed_from, "images": len(dataset.items),
            "skipped": len(dataset.skipped), "dedup_dropped": dataset.dropped,
            "dedup_groups": len(dataset.groups), "mitigations": cfg.mitigations(),
            "samples": counters["samples"],
            "samples_dropped": counters.get("samples_dropped", 0),
            "dropped_by_filter": counters["dropped"],
            "screenings": counters.get("screenings", []),
            "filter_reports": {f.name: f.report() for f in filters if hasattr(f, "report")},
            "seconds_training": round(elapsed, 1),
            "seconds_dedup_this_run": round(t_dedup, 2),
            "seconds_this_run": round(time.time() - t_start, 1),
            "device": str(device), "processes": accelerator.num_processes,
            "threads": torch.get_num_threads(), "mixed_precision": cfg.mixed_precision}
        (out / "train_log.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return target


def load_config(out: str | Path) -> FinetuneConfig:
    """The :class:`FinetuneConfig` of a run folder."""
    settings = json.loads((Path(out) / "train_config.json").read_text())
    return FinetuneConfig(**settings["train"])


__all__ = ["EMA", "FinetuneConfig", "encode_latents", "finetune", "load_config",
           "resolve_model"]

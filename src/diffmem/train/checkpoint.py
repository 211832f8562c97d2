"""A ``diffmem train`` run's folder and saved state: the settings check that makes a rerun resume
(``train_config.json``), the run files, the EMA weights, and the checkpoint (``state/checkpoint.pt``:
models, optimizer, EMA, step, counters, loss-filter state and every process's random generators),
written atomically and restored so that a resumed run continues exactly where an uninterrupted one
would be."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from diffmem.runtime.errors import ConfigError
from diffmem.train.config import FinetuneConfig

CHECKPOINT = "checkpoint.pt"


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def _write_run_files(out: Path, settings: dict, dataset, cfg: FinetuneConfig, *,
                     resuming: bool) -> None:
    """``state/``, ``train_config.json`` (a new run), ``skipped.json`` and ``dedup.json``."""
    (out / "state").mkdir(parents=True, exist_ok=True)
    if not resuming:
        (out / "train_config.json").write_text(json.dumps(settings, indent=2))
    (out / "skipped.json").write_text(json.dumps(dataset.skipped, indent=2))
    if cfg.dedup:
        (out / "dedup.json").write_text(json.dumps(
            {"criterion": cfg.dedup, "threshold": cfg.dedup_threshold, "keep": cfg.dedup_keep,
             "groups": len(dataset.groups), "dropped": dataset.dropped,
             "kept_items": len(dataset.items), "group_list": dataset.groups}, indent=2))


def restore_run_state(run) -> None:
    """Continue from the checkpoint, if any; drop the screenings logged after it."""
    cfg, screen = run.cfg, run.screen
    if run.ckpt.exists():
        state = torch.load(run.ckpt, map_location="cpu", weights_only=False)
        run.unet.load_state_dict(state["unet"])
        if cfg.train_text_encoder:
            run.text_encoder.load_state_dict(state["text_encoder"])
        run.opt.load_state_dict(state["opt"])
        if run.ema is not None:
            run.ema.shadow = [s.clone() for s in state["ema"]]
        run.step, run.elapsed = int(state["step"]), float(state["elapsed"])
        run.counters = state["counters"]
        for f, f_state in zip(run.filters, state.get("filter_state") or [], strict=False):
            if f_state is not None and hasattr(f, "load_state_dict"):
                f.load_state_dict(f_state)
        if screen is not None:
            screen.flagged = set(state.get("screen_flagged") or ())
            screen.threshold = state.get("screen_threshold", screen.threshold)
        rng_state = state["rng"][run.rank] if run.rank < len(state["rng"]) else None
        if rng_state is not None:
            run.rng.bit_generator.state = rng_state[0]
            run.gen.set_state(rng_state[1])
    run.resumed_from = run.step
    if screen is not None and run.main and run.screen_log.exists():
        kept = [line for line in run.screen_log.read_text().splitlines()
                if line and json.loads(line)["step"] < run.step]
        run.screen_log.write_text("".join(x + "\n" for x in kept))


def save_run_state(run) -> None:
    """Write the checkpoint of a run (``trainer._Run``; the main process writes, after gathering every
    process's random generators)."""
    accelerator, cfg, screen = run.accelerator, run.cfg, run.screen
    rngs = [(run.rng.bit_generator.state, run.gen.get_state())]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        rngs = gather_object(rngs)
    if run.main:
        _atomic_save({
            "unet": accelerator.unwrap_model(run.unet).state_dict(),
            "text_encoder": (accelerator.unwrap_model(run.text_encoder).state_dict()
                             if cfg.train_text_encoder else None),
            "opt": run.opt.state_dict(),
            "ema": run.ema.shadow if run.ema is not None else None,
            "step": run.step, "elapsed": run.elapsed + (time.time() - run.t_loop),
            "counters": run.counters, "rng": rngs,
            "filter_state": [f.state_dict() if hasattr(f, "state_dict") else None
                             for f in run.filters],
            "screen_flagged": sorted(screen.flagged) if screen is not None else None,
            "screen_threshold": screen.threshold if screen is not None else None}, run.ckpt)


def load_config(out: str | Path) -> FinetuneConfig:
    """The :class:`FinetuneConfig` of a run folder."""
    settings = json.loads((Path(out) / "train_config.json").read_text())
    return FinetuneConfig(**settings["train"])

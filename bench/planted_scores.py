"""How the planted captions of the training benchmark look to the detectors, before and after
fine-tuning (docs/training.md, the caveat on the caption screen and why the magnitude filter falls
short).

1. First-step noise magnitude (``diffmem detect``'s statistic, 1 step, ``--generations``) of the
   planted captions against the generic captions' median / 99th percentile / maximum, for each
   model given.
2. With ``--bands``: the normalised per-sample training magnitude (Wen's training filter, at
   random timesteps) of 256 generic and the planted samples, per timestep band.

Run: ``OMP_NUM_THREADS=2 PYTHONPATH=src python bench/planted_scores.py --data runs/tbench/data
testbed runs/tbench/runs/plain/pipeline [--bands]``.
"""

from __future__ import annotations

import argparse
import json
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch


def first_step(models, data: Path, generations: int) -> None:
    from diffmem.detect import NoiseMagnitude

    rows = [json.loads(x) for x in (data / "data.jsonl").read_text().splitlines()]
    generic = list(dict.fromkeys(r["caption"][0] for r in rows if r["kind"] == "generic"))
    planted = [p["caption"] for p in json.loads((data / "manifest.json").read_text())["planted"]]
    det = NoiseMagnitude(steps=1, generations=generations, batch_size=64)
    for model in models:
        g, p = det.score(model, generic), det.score(model, planted)
        med = float(np.median(g))
        print(f"{model}: generic median {med:.3f}, p99 {np.percentile(g, 99):.3f}, max "
              f"{g.max():.3f}; planted {np.round(p, 3).tolist()} (ratio to the median "
              f"{np.round(p / med, 2).tolist()})")


@torch.no_grad()
def bands(models, data: Path) -> None:
    from PIL import Image

    from diffmem.core.training import DiffusionStep, draw_noise
    from diffmem.models.adapter import load_pipeline
    from diffmem.similarity.pixel import to_tensor
    from diffmem.train.filters import MagnitudeFilter
    from diffmem.train.trainer import _tokenize, encode_latents, resolve_model

    rows = [json.loads(x) for x in (data / "data.jsonl").read_text().splitlines()]
    generic = [r for r in rows if r["kind"] == "generic"][:256]
    planted = list({r["planted"]: r for r in rows if r["kind"] == "planted"}.values())

    def scores(pipe, rs, reps):
        images = to_tensor(np.stack([np.asarray(Image.open(data / r["image"])) for r in rs]))
        step = DiffusionStep(pipe.scheduler, filters=[MagnitudeFilter(1e30)])
        uncond = pipe.text_encoder(_tokenize(pipe.tokenizer, [""]))[0]
        mean, std = encode_latents(pipe.vae, images, "cpu")
        emb = pipe.text_encoder(_tokenize(pipe.tokenizer, [r["caption"][0] for r in rs]))[0]
        gen = torch.Generator().manual_seed(0)
        mags, ts = [], []
        for _ in range(reps):
            z0, noise, t = draw_noise(mean, std, gen, step.num_train_timesteps)
            res = step(pipe.unet, z0, noise, t, emb,
                       context={"unet_eval": pipe.unet, "uncond": uncond})
            mags.append(res.scores["magnitude"])
            ts.append(t)
        return torch.cat(mags).numpy(), torch.cat(ts).numpy()

    for model in models:
        pipe = load_pipeline(resolve_model(model))
        mg, tg = scores(pipe, generic, 4)
        mp, tp = scores(pipe, planted, 64)
        print(f"{model}: normalised training magnitude per timestep band")
        edges = np.linspace(0, 1000, 6)
        for a, b in pairwise(edges):
            sg, sp = mg[(tg >= a) & (tg < b)], mp[(tp >= a) & (tp < b)]
            print(f"  t {a:4.0f}-{b:4.0f}: generic median {np.median(sg):6.2f} p95 "
                  f"{np.percentile(sg, 95):6.2f} | planted median {np.median(sp):6.2f} p5 "
                  f"{np.percentile(sp, 5):6.2f}  (n = {len(sg)}, {len(sp)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="'testbed' and/or fine-tuned pipeline folders")
    ap.add_argument("--data", required=True, help="the planted set folder")
    ap.add_argument("--generations", type=int, default=1)
    ap.add_argument("--bands", action="store_true")
    a = ap.parse_args()
    first_step(a.models, Path(a.data), a.generations)
    if a.bands:
        bands(a.models, Path(a.data))


if __name__ == "__main__":
    main()

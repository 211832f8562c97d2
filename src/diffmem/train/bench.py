"""Planted-duplicates benchmark of the training-time mitigations (``diffmem eval training``).

A fine-tuning set is built from the testbed's data module with another seed (:data:`PLANTED`):
``n_generic`` new generic scenes (their first caption; MC draws from both) plus ``k`` new complex
images, each repeated ``copies`` times under one caption with a rare two-word trigger that neither
the shipped testbed nor the new generic captions use ("the <a> <b> poster"); each planted image
also has 4 descriptive captions naming some of its shapes (the alternative captions MC draws from,
as DCR's MC draws from BLIP captions). The shipped testbed is fine-tuned on it once per method
(:data:`METHODS`), with the same step budget (:data:`TRAIN`), and each result is measured:

- planted memorization rate: ``seeds`` (4) generations per planted caption (DDIM 50 steps,
  guidance 7.5, seed s for generation s), a copy when the tiled L2 (grid 4) to the planted
  image's VAE round trip is below 0.15 (the testbed criterion, :mod:`diffmem.testbed.verify`);
- held-out alignment: the attribute probe's mean probability of the named (colour, shape) pairs
  over the generations of the testbed's held-out prompts (``heldout_seeds`` per prompt);
- held-out FPD: Fréchet probe distance of those generations against the shipped testbed's
  rendered generic training images (:class:`diffmem.eval.quality.ProbeFeatures`);
- training time: the loop's seconds (``train_log.json``), plus the dedup time, against plain.

Everything lands in ``OUT``: ``data/`` (the set, a JSONL file), ``runs/<method>/`` (a
``diffmem train`` run folder each, resumable), ``eval/<method>.json`` and ``report.json``;
rerunning resumes where it stopped. ``plot_benchmark`` draws the bar chart (``chart.png``) and
``markdown_report`` writes the table with a text bar chart (``report.md``, as in docs/training.md).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from diffmem.runtime.errors import ConfigError

# the planted set and the report live in their own modules; their names stay importable here
from diffmem.train.bench_report import _table, markdown_report, plot_benchmark
from diffmem.train.planted import PLANTED as PLANTED
from diffmem.train.planted import _color_names as _color_names
from diffmem.train.planted import build_planted_set
from diffmem.train.planted import planted_words as planted_words

#: the step budget of every run (plain and each mitigation)
TRAIN = {"steps": 600, "batch_size": 32, "lr": 4e-4, "warmup_steps": 20, "lr_schedule": "cosine",
         "checkpoint_every": 50, "log_every": 10, "caption_dropout": 0.1,
         "train_text_encoder": True, "seed": 0}
#: method -> FinetuneConfig fields on top of TRAIN
METHODS: dict[str, dict] = {
    "plain": {},
    "dedup": {"dedup": "pixel"},
    "magnitude": {"magnitude_filter": "calibrated"},  # see calibrate_filters
    "entropy": {"entropy_filter": "calibrated"},
    "screen": {"screen_captions": "calibrated"},  # see calibrate_screen
    "loss": {"loss_filter": 0.5},  # the default ratio (docs/training.md: how it was chosen)
    "mc": {"augment": {"mc": True}},
    "rc": {"augment": {"p_rc": 0.1}},
    "rt": {"augment": {"p_rt": 0.1}},
    "cwr": {"augment": {"p_cwr": 0.1}},
    "gn": {"gn": 0.1},
    "magnitude_ref2": {"magnitude_filter": 2.0},  # Wen's reference threshold, normalised
}


def _generate(adapter, prompts: Sequence[str], seeds: int, *, steps: int = 50,
              guidance_scale: float = 7.5, batch_size: int = 64) -> torch.Tensor:
    from diffmem.core.sampling import sample, seeded_generators

    jobs = [(p, s) for p in prompts for s in range(seeds)]
    out = []
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i : i + batch_size]
        res = sample(adapter, [p for p, _ in chunk], num_inference_steps=steps,
                     guidance_scale=guidance_scale,
                     generator=seeded_generators([s for _, s in chunk], adapter.device))
        out.append(res.images.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def _generic_features(cache: Path, spec=None) -> torch.Tensor:
    """Probe features of the rendered generic training images of the testbed of ``spec`` (None:
    the shipped testbed; cached)."""
    if cache.is_file():
        return torch.load(cache)
    from diffmem.eval.quality import ProbeFeatures
    from diffmem.similarity.pixel import to_tensor
    from diffmem.testbed import shipped_testbed_spec
    from diffmem.testbed.data import build_testbed

    tb = build_testbed(spec or shipped_testbed_spec())
    images = to_tensor(np.stack([img for _, img in tb.images(["generic"])]))
    feats = ProbeFeatures()(images)
    torch.save(feats, cache)
    return feats


def evaluate_model(model: str | Path, data_dir: str | Path, manifest: dict, *, seeds: int = 4,
                   heldout_seeds: int = 2, feature_cache: Path | None = None,
                   base_spec=None) -> dict:
    """Planted memorization, held-out alignment and FPD of one (fine-tuned) testbed pipeline;
    held-out prompts and FPD reference from the testbed of ``base_spec`` (the model that was
    fine-tuned; None: the shipped testbed)."""
    from PIL import Image

    from diffmem.eval.alignment import attribute_alignment
    from diffmem.eval.quality import ProbeFeatures, frechet_distance
    from diffmem.models.adapter import load_adapter
    from diffmem.similarity.pixel import tiled_l2, to_tensor
    from diffmem.testbed import shipped_testbed_spec
    from diffmem.testbed.data import build_testbed
    from diffmem.testbed.verify import REPLICATION_THRESHOLD, TILE_GRID, vae_roundtrip

    adapter = load_adapter(model)
    t0 = time.perf_counter()
    planted = manifest["planted"]
    originals = to_tensor(np.stack([np.asarray(Image.open(Path(data_dir) / p["image"]))
                                    for p in planted]))
    refs = vae_roundtrip(adapter, originals)
    gen = _generate(adapter, [p["caption"] for p in planted], seeds)
    own = refs.repeat_interleave(seeds, dim=0)
    dist = tiled_l2(gen, own, grid=TILE_GRID)
    copied = dist < REPLICATION_THRESHOLD
    per_item = {p["id"]: float(copied[i * seeds : (i + 1) * seeds].float().mean())
                for i, p in enumerate(planted)}
    by_copies: dict[int, list[float]] = {}
    for p in planted:
        by_copies.setdefault(int(p.get("copies", manifest["copies"])), []).append(per_item[p["id"]])
    heldout = [p.prompt for p in build_testbed(base_spec or shipped_testbed_spec()).prompts
               if p.kind == "heldout"]
    hgen = _generate(adapter, heldout, heldout_seeds)
    caps = [p for p in heldout for _ in range(heldout_seeds)]
    align = attribute_alignment(hgen, caps)
    ok = ~torch.isnan(align)
    real = _generic_features(feature_cache, base_spec) if feature_cache else None
    feats = ProbeFeatures()(hgen)
    fpd = frechet_distance(real, feats) if real is not None else None
    return {
        "planted_memorization_rate": float(copied.float().mean()),
        "planted_items_memorized": sum(v >= 0.5 for v in per_item.values()),
        "planted_per_item": per_item,
        "planted_by_copies": {str(c): float(np.mean(v)) for c, v in sorted(by_copies.items())},
        "planted_distance_median": float(dist.median()),
        "heldout_alignment": float(align[ok].mean()) if bool(ok.any()) else None,
        "heldout_fpd": fpd, "n_planted_images": len(gen), "n_heldout_images": len(hgen),
        "seconds_eval": round(time.perf_counter() - t0, 1),
    }


#: calibration of the loss filters on clean data: the magnitude threshold is this percentile of
#: the base model's normalised magnitudes, the entropy threshold this (low) percentile of its
#: entropies, over generic samples of the fine-tuning set at random timesteps
CALIBRATION = {"magnitude_percentile": 95, "entropy_percentile": 5, "samples": 512, "seed": 0}


@torch.no_grad()
def calibrate_filters(model: str | Path, data_dir: str | Path, *, percentiles: dict | None = None
                      ) -> dict:
    """Thresholds of the magnitude and entropy filters for one model, from clean samples.

    The base model's normalised magnitude (:func:`diffmem.train.filters.normalised_magnitude`)
    and attention entropy of ``samples`` generic (never duplicated) images of the fine-tuning set
    with their first caption, each at a random timestep (as in training); the thresholds are the
    :data:`CALIBRATION` percentiles, so that about 5% of clean samples are dropped by each filter
    before any fine-tuning. The reference threshold 2 of Wen et al. belongs to SD's magnitudes
    and is measured beside it (``magnitude_ref2``).
    """
    from PIL import Image

    from diffmem.core.training import DiffusionStep, draw_noise
    from diffmem.models.adapter import load_pipeline
    from diffmem.similarity.pixel import to_tensor
    from diffmem.train.filters import EntropyFilter, MagnitudeFilter
    from diffmem.train.trainer import _tokenize, encode_latents, resolve_model

    cal = {**CALIBRATION, **(percentiles or {})}
    pipe = load_pipeline(resolve_model(model))
    rows = [json.loads(line) for line in (Path(data_dir) / "data.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["kind"] == "generic"][: cal["samples"]]
    images = to_tensor(np.stack([np.asarray(Image.open(Path(data_dir) / r["image"]))
                                 for r in rows]))
    caps = [r["caption"][0] for r in rows]
    step = DiffusionStep(pipe.scheduler, filters=[MagnitudeFilter(1e30), EntropyFilter(-1.0)])
    uncond = pipe.text_encoder(_tokenize(pipe.tokenizer, [""]))[0]
    mean, std = encode_latents(pipe.vae, images, "cpu")
    gen = torch.Generator().manual_seed(cal["seed"])
    mags, ents = [], []
    for i in range(0, len(rows), 64):
        z0, noise, t = draw_noise(mean[i : i + 64], std[i : i + 64], gen,
                                  step.num_train_timesteps)
        emb = pipe.text_encoder(_tokenize(pipe.tokenizer, caps[i : i + 64]))[0]
        res = step(pipe.unet, z0, noise, t, emb,
                   context={"unet_eval": pipe.unet, "uncond": uncond})
        mags.append(res.scores["magnitude"])
        ents.append(res.scores["entropy"])
    mag, ent = torch.cat(mags).numpy(), torch.cat(ents).numpy()
    return {"magnitude_threshold": float(np.percentile(mag, cal["magnitude_percentile"])),
            "entropy_threshold": float(np.percentile(ent, cal["entropy_percentile"])),
            "magnitude_percentiles_5_50_95": np.percentile(mag, [5, 50, 95]).round(3).tolist(),
            "entropy_percentiles_5_50_95": np.percentile(ent, [5, 50, 95]).round(3).tolist(),
            "share_above_reference_2": float((mag >= 2.0).mean()), **cal}


def calibrate_screen(model: str | Path, data_dir: str | Path, *, fpr: float = 0.01) -> dict:
    """Threshold of the caption screen (a ratio to the median, as the screen flags): the base
    model's first-step noise magnitude (the detector's statistic,
    :class:`~diffmem.detect.NoiseMagnitude`, 1 step, 4 generations) over the generic (never
    duplicated) captions of the fine-tuning set, its ``1 - fpr`` quantile (1%: the detector's own
    calibration rule) over its median."""
    from diffmem.detect import NoiseMagnitude

    rows = [json.loads(line) for line in (Path(data_dir) / "data.jsonl").read_text().splitlines()]
    caps = list(dict.fromkeys(r["caption"][0] for r in rows if r["kind"] == "generic"))
    det = NoiseMagnitude(steps=1, generations=4, fpr=fpr, batch_size=64)  # as the screen scores
    scores = det.score(model, caps)
    return {"screen_threshold": float(det.fit(scores=scores).threshold_ / np.median(scores)),
            "screen_absolute_threshold": float(det.threshold_),
            "screen_percentiles_50_95_99": np.percentile(scores, [50, 95, 99]).round(4).tolist(),
            "screen_fpr": fpr, "screen_captions": len(caps)}


def method_config(name: str, overrides: dict | None = None, steps: int | None = None,
                  calibration: dict | None = None):
    """The :class:`~diffmem.train.trainer.FinetuneConfig` of one benchmark run."""
    from diffmem.train.captions import CaptionAugment
    from diffmem.train.trainer import FinetuneConfig

    if name not in METHODS:
        raise ConfigError(f"unknown benchmark method {name!r}; choose from {', '.join(METHODS)}")
    fields = {**TRAIN, **METHODS[name], **(overrides or {})}
    if steps is not None:
        fields["steps"] = steps
    if "augment" in fields:
        fields["augment"] = CaptionAugment(**fields["augment"])
    for key, cal_key in (("magnitude_filter", "magnitude_threshold"),
                         ("entropy_filter", "entropy_threshold"),
                         ("screen_captions", "screen_threshold")):
        if fields.get(key) == "calibrated":
            if calibration is None:
                raise ConfigError(f"the {name} run needs calibrate_filters' thresholds")
            fields[key] = round(calibration[cal_key], 4)
    return FinetuneConfig(**fields)


def run_benchmark(out: str | Path, *, model: str | Path = "testbed",
                  methods: Sequence[str] | None = None,
                  planted_copies: Sequence[int] | None = None,
                  steps: int | None = None, seeds: int = 4, heldout_seeds: int = 2,
                  overrides: dict[str, dict] | None = None, progress: bool = True) -> dict:
    """Build the set, fine-tune ``model`` (a testbed: ``testbed``, ``testbed-graded`` or a
    testbed folder) per method, evaluate; resumable (module docstring). The planted set avoids
    the model's words and, for a model whose data has the planted seed, takes another
    (:func:`~diffmem.train.planted.planted_seed`). ``planted_copies``: one count per planted
    image instead of :data:`PLANTED`'s ``k`` x ``copies`` (a dose-response set: the report then
    holds the planted memorization rate per count and method, ``dose``)."""
    from diffmem.testbed import require_spec
    from diffmem.train.planted import planted_seed
    from diffmem.train.trainer import finetune, resolve_model

    out = Path(out)
    base = require_spec(resolve_model(model), "diffmem eval training")
    base_file = out / "base_model.json"
    if base_file.is_file():  # a folder of another base model: one clear error, nothing written
        was = json.loads(base_file.read_text())["model"]
        if was != str(model):
            raise ConfigError(f"{out} holds the training benchmark of model {was!r}, not "
                              f"{str(model)!r}; give another --out")
    elif (out / "data" / "manifest.json").is_file() and str(model) != "testbed":
        raise ConfigError(f"{out} holds the training benchmark of the testbed (made before the "
                          f"base model was recorded), not {str(model)!r}; give another --out")
    out.mkdir(parents=True, exist_ok=True)
    base_file.write_text(json.dumps({"model": str(model)}))
    manifest = build_planted_set(out / "data", seed=planted_seed(base), base=base,
                                 **({} if planted_copies is None
                                    else {"copies": list(planted_copies)}))
    overrides = dict(overrides or {})
    settings_file = out / "bench_overrides.json"
    if settings_file.is_file():
        overrides = {**json.loads(settings_file.read_text()), **overrides}
    settings_file.write_text(json.dumps(overrides, indent=2))
    methods = list(methods or METHODS)
    (out / "eval").mkdir(exist_ok=True)
    feature_cache = out / "generic_probe_features.pt"
    rows = {}
    base_eval = out / "eval" / "base.json"
    evaluated = {"seeds": seeds, "heldout_seeds": heldout_seeds, "feature_cache": feature_cache,
                 "base_spec": base}
    if not base_eval.is_file():
        base_eval.write_text(json.dumps(evaluate_model(model, out / "data", manifest,
                                                       **evaluated), indent=2))
    rows["base (no fine-tune)"] = json.loads(base_eval.read_text())
    cal_file = out / "calibration.json"
    if not cal_file.is_file():
        cal_file.write_text(json.dumps(calibrate_filters(model, out / "data"), indent=2))
    calibration = json.loads(cal_file.read_text())
    if "screen_threshold" not in calibration:  # folders calibrated before the screen existed
        calibration.update(calibrate_screen(model, out / "data"))
        cal_file.write_text(json.dumps(calibration, indent=2))
    for name in methods:
        ev = out / "eval" / f"{name}.json"
        if not ev.is_file():
            cfg = method_config(name, overrides.get(name), steps, calibration)
            target = finetune(model, out / "data" / "data.jsonl", out / "runs" / name, cfg,
                              progress=progress)
            row = evaluate_model(target, out / "data", manifest, **evaluated)
            log = json.loads((out / "runs" / name / "train_log.json").read_text())
            row.update(seconds_training=log["seconds_training"],
                       seconds_dedup=log.get("seconds_dedup_this_run", 0.0),
                       samples_dropped=log.get("samples_dropped", 0), samples=log["samples"],
                       dedup_groups=log["dedup_groups"], dedup_dropped=log["dedup_dropped"],
                       steps=log["steps"])
            ev.write_text(json.dumps(row, indent=2))
        rows[name] = json.loads(ev.read_text())
    report = {"model": str(model), "planted": manifest, "train": TRAIN,
              "methods": {m: METHODS[m] for m in methods}, "calibration": calibration,
              "overrides": overrides, "seeds": seeds, "heldout_seeds": heldout_seeds,
              "rows": rows, "table": _table(rows)}
    if not isinstance(manifest["copies"], int):  # one count per planted image: the dose table
        from diffmem.eval.dose import dose_chart, dose_table

        by_count = {name: [{"duplicates": int(c), "copy_rate": r}
                           for c, r in row.get("planted_by_copies", {}).items()]
                    for name, row in rows.items()}
        report["dose"] = dose_table(by_count)
        report["dose_chart"] = dose_chart(by_count, title="planted memorization by copies")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown_report(report))
    plot_benchmark(report, out / "chart.png")
    return report

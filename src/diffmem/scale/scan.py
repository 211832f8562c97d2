"""Scan a prompt log of any size with one or more detectors, locally or on a Ray cluster, resumably.

CLI: ``diffmem scan PROMPTS --out DIR [--engine local|ray] [--address ADDR] [--workers N]
[--detector NAME ...] [--threshold T | --threshold-from CLEAN] [--index IDX | --no-index]
[--explain]`` (docs/scan.md).

:func:`scan` takes the prompts, the output folder and a :class:`ScanConfig` (every other option).
The prompts (:mod:`diffmem.scale.stream`) are cut into shards of ``shard_size``; each shard is
scored by one worker holding the model (:class:`ShardScorer`) and written as one Parquet file
``shard-NNNNNN.parquet`` with one row per prompt and detector: ``prompt_id, prompt, source,
detector, score, threshold, decision, estimate, verdict_source, verdict, settings,
explanation``; with the training index the decision is the verdict by generation, else the
detector's estimate ``score > threshold`` (:mod:`diffmem.scale.scan_verdict`). A shard file is
written to a temporary name and renamed when complete, so a shard is either entirely there or not
at all: a rerun after a kill skips the shards that exist and redoes the others, and a worker that
finds its shard already written (a retried task) does not write it again.

The folder's other files (:mod:`diffmem.scale.scan_folder`): ``manifest.json`` records what the
scan is (model fingerprint, detectors and their settings, thresholds, the input files with sizes
and times, the shard size, the training index of the verdict); a rerun into a folder holding
another scan's manifest is refused. At the end ``summary.json`` and ``scores.png`` (score
histogram per detector) are written from the shard files.

Engines: ``local`` scores the shards one after the other in this process; ``ray`` runs Ray Data
``map_batches`` over the pending shards with a pool of ``workers`` actors, each loading the model
once (``num_gpus=1`` per actor when the cluster has GPUs, else ``threads`` CPU threads each). Both
engines call the same :meth:`ShardScorer.run_shard` on the same shards with the same seeds, so
their scores are the same.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from diffmem.runtime.errors import ConfigError
from diffmem.scale.scan_folder import (
    MANIFEST,
    SCHEMA,
    check_manifest,
    model_fingerprint,
    read_manifest,
    shard_name,
    summarize,
    write_json,
)
from diffmem.scale.scan_verdict import (
    decide,
    make_judge,
    plan_verdict,
    verdict_identity,
    verdict_summary,
)
from diffmem.scale.stream import Shard, ShardPlan, plan_shards, read_shard

FORMAT = 2  # 2: the columns estimate, verdict_source, verdict


# ----------------------------------------------------------------------------- the job


@dataclass
class ScanJob:
    """Everything a worker needs to score shards (sent to Ray actors as is)."""

    model: str
    detectors: list[tuple[str, dict]]  # registry name, options
    thresholds: dict[str, float | None]
    out: str
    plan: ShardPlan
    explain: bool = False
    explain_words: int = 3
    device: str | None = None
    threads: int | None = None
    settings: dict[str, dict] = field(default_factory=dict)
    verdict: dict | None = None  # the verdict by generation (scan_verdict.plan_verdict)


def _plain_settings(det) -> dict:
    out = {"detector": det.name, "class": type(det).__name__}
    for k, v in sorted(vars(det).items()):
        if k.startswith("_") or k.endswith("_"):
            continue
        if isinstance(v, tuple):
            v = list(v)
        if v is None or isinstance(v, (bool, int, float, str)) or (
                isinstance(v, list) and all(isinstance(x, (int, str)) for x in v)):
            out[k] = v
    return out


class ShardScorer:
    """A worker: holds the model and detectors, scores and writes whole shards."""

    def __init__(self, job: ScanJob):
        import torch

        from diffmem.detect.registry import make_detector
        from diffmem.models.adapter import load_adapter

        if job.threads:
            torch.set_num_threads(job.threads)
        self.job = job
        self.adapter = load_adapter(job.model, device=job.device)
        self.detectors = [make_detector(name, **opts) for name, opts in job.detectors]
        self.judge = make_judge(job.verdict)  # None: the detectors' estimates decide
        self.out = Path(job.out)

    def run_shard(self, shard: Shard) -> int:
        """Score and write ``shard`` unless its file exists; returns its prompt count."""
        path = self.out / shard_name(shard.index)
        if path.exists():
            return shard.count
        records = read_shard(self.job.plan, shard)
        table = self.score_records(records)
        tmp = self.out / f".{path.name}.{uuid.uuid4().hex}.tmp"
        import pyarrow.parquet as pq

        pq.write_table(table, tmp)
        os.replace(tmp, path)
        return len(records)

    def score_records(self, records) -> object:
        import pyarrow as pa

        from diffmem.models.adapter import quiet_truncation

        prompts = [r.prompt for r in records]
        cols: dict[str, list] = {k: [] for k in SCHEMA.names}
        verdicts = None
        if self.judge is not None:  # one verdict per prompt, shared by the detectors' rows
            with quiet_truncation():
                verdicts = self.judge(self.adapter, prompts, evidence=False)
        for det in self.detectors:
            scores = det.score(self.adapter, prompts)
            thr = self.job.thresholds.get(det.name)
            flags, estimate, source, verdict = decide(scores, thr, verdicts)
            explanations = self._explain(det, prompts, flags)
            settings = json.dumps(self.job.settings.get(det.name) or _plain_settings(det),
                                  sort_keys=True)
            n = len(records)
            cols["prompt_id"] += [r.prompt_id for r in records]
            cols["prompt"] += prompts
            cols["source"] += [r.source for r in records]
            cols["detector"] += [det.name] * n
            cols["score"] += [float(x) for x in scores]
            cols["threshold"] += [thr] * n
            for key, values in (("decision", flags), ("estimate", estimate),
                                ("verdict_source", source), ("verdict", verdict),
                                ("explanation", explanations)):
                cols[key] += values
            cols["settings"] += [settings] * n
        return pa.table(cols, schema=SCHEMA)

    def _explain(self, det, prompts: list[str], flags: list) -> list[str | None]:
        """Top words (Wen et al. token attribution) of the flagged prompts, as JSON."""
        out: list[str | None] = [None] * len(prompts)
        flagged = [i for i, f in enumerate(flags) if f]
        if not self.job.explain or not flagged:
            return out
        from diffmem.explain import TokenAttributor
        from diffmem.runtime.errors import PromptError

        attributor = TokenAttributor(self.adapter, steps=1, seeds=det.generations, seed=det.seed,
                                     num_inference_steps=det.num_inference_steps,
                                     guidance_scale=det.guidance_scale,
                                     batch_size=det.batch_size)
        for i in flagged:
            try:
                [attr] = attributor.attribute([prompts[i]])
                out[i] = json.dumps({"top_words": attr.top(self.job.explain_words)})
            except PromptError as e:
                out[i] = json.dumps({"error": str(e)})
        return out


# ----------------------------------------------------------------------------- the scan


@dataclass(frozen=True)
class ScanConfig:
    """Every option of a scan (``diffmem scan``'s flags); :func:`scan` takes the input and the
    output folder besides."""

    model: str | Path = "testbed"
    detectors: Sequence[str] = ("noise_magnitude",)
    # where and how it runs
    engine: str = "local"  # "local" or "ray"
    address: str | None = None  # Ray cluster to join (default: a small local one)
    workers: int = 1  # Ray model actors
    threads: int | None = None  # CPU threads per worker (default 1)
    device: str | None = None
    progress: bool = False
    # the input
    shard_size: int = 1024
    prompt_column: str | None = None
    id_column: str | None = None
    # decisions
    threshold: float | None = None  # one detector's threshold
    threshold_from: str | Path | None = None  # clean prompts to calibrate each threshold on
    fpr: float = 0.01  # target FPR of threshold_from
    explain: bool = False  # top words of each flagged prompt
    # the verdict by generation (scan_verdict): the training index's folder, where it came from
    index: str | Path | None = None
    index_origin: str = "given"  # "given" (--index) or "stored" (`diffmem calibrate --index`)
    preview_generations: int = 4  # previews per prompt of the verdict
    preview_steps: int = 20  # their schedule length
    # detector options
    steps: int | str | None = None
    generations: int = 1
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    scheduler: str | None = None
    batch_size: int = 16
    seed: int = 0

    def detector_names(self) -> list[str]:
        """The detectors, each once, after checking the options that need no model."""
        if self.engine not in ("local", "ray"):
            raise ConfigError(f"unknown engine {self.engine!r}; use 'local' or 'ray'")
        if self.workers < 1:
            raise ConfigError("--workers must be >= 1")
        names = list(dict.fromkeys(self.detectors))
        if not names:
            raise ConfigError("give at least one detector")
        if self.threshold is not None and len(names) > 1:
            raise ConfigError("--threshold applies to one detector; use --threshold-from with "
                              "several")
        return names

    def detector_options(self) -> dict:
        """The keyword arguments of every detector (those that are set)."""
        from diffmem.core.steps import parse_steps

        options = {"steps": parse_steps(self.steps), "generations": self.generations,
                   "fpr": self.fpr, "num_inference_steps": self.num_inference_steps,
                   "guidance_scale": self.guidance_scale, "scheduler": self.scheduler,
                   "batch_size": self.batch_size, "seed": self.seed}
        return {k: v for k, v in options.items() if v is not None}


def scan(prompts: str | Path, out: str | Path, config: ScanConfig | None = None) -> dict:
    """Score every prompt of ``prompts`` into the scan folder ``out``; resumes a killed scan.

    ``config.threshold`` (one detector) or ``config.threshold_from`` (clean prompts, calibrated at
    ``config.fpr``) set each prompt's estimate ``score > threshold``; without either, a testbed
    model is calibrated on its held-out prompts and other models get none (null). With
    ``config.index`` (the training index's folder) the ``decision`` is the verdict by generation,
    else the estimate (:mod:`diffmem.scale.scan_verdict`).
    ``config.explain`` adds the top words of each flagged prompt. Returns the summary (also
    ``out/summary.json``).
    """
    cfg = config or ScanConfig()
    out = Path(out)
    job, model_id, dets = _plan_job(prompts, out, cfg)
    manifest = _manifest(job, model_id, cfg.shard_size)
    _prepare_folder(out, manifest)
    done = {s.index for s in job.plan.shards if (out / shard_name(s.index)).exists()}
    pending = [s for s in job.plan.shards if s.index not in done]
    t0 = time.perf_counter()
    _score_pending(job, pending, cfg, initial=sum(s.count for s in job.plan.shards
                                                  if s.index in done))
    elapsed = time.perf_counter() - t0
    summary = summarize(out, job.plan, [d.name for d in dets])
    n_scored = sum(s.count for s in pending)
    summary.update(engine=cfg.engine, workers=cfg.workers if cfg.engine == "ray" else 1,
                   resumed_shards=len(done), scored_shards=len(pending),
                   scored_prompts=n_scored, seconds=round(elapsed, 3),
                   prompts_per_s=(round(n_scored / elapsed, 3)
                                  if pending and elapsed > 0 else None),
                   verdict=verdict_summary(job.verdict, job.thresholds, cfg.index_origin))
    write_json(out / "summary.json", summary)
    return summary


def _plan_job(prompts: str | Path, out: Path, cfg: ScanConfig) -> tuple[ScanJob, dict, list]:
    """The job (detectors, shards, model and thresholds), its model's identity and detectors."""
    from functools import cache

    from diffmem.detect.registry import make_detector
    from diffmem.models.adapter import load_adapter

    names = cfg.detector_names()
    options = cfg.detector_options()
    dets = [make_detector(name, **options) for name in names]
    plan = plan_shards(prompts, cfg.shard_size, prompt_column=cfg.prompt_column,
                       id_column=cfg.id_column)
    model_id = model_fingerprint(cfg.model)
    adapter = cache(lambda: load_adapter(model_id["path"], scheduler=cfg.scheduler,
                                         device=cfg.device))  # the driver's, loaded when needed
    verdict = plan_verdict(cfg.index, adapter, generations=cfg.preview_generations,
                           steps=cfg.preview_steps, seed=cfg.seed,
                           guidance_scale=cfg.guidance_scale, batch_size=cfg.batch_size)
    job = ScanJob(model=model_id["path"], detectors=[(d.name, options) for d in dets],
                  thresholds={}, out=str(out), plan=plan, explain=cfg.explain,
                  device=cfg.device, threads=cfg.threads or 1,
                  settings={d.name: _plain_settings(d) for d in dets}, verdict=verdict)
    job.thresholds = _thresholds(dets, adapter, cfg.threshold, cfg.threshold_from,
                                 read_manifest(out))
    if cfg.explain and verdict is None and any(v is None for v in job.thresholds.values()):
        raise ConfigError("--explain needs a decision: pass --threshold, --threshold-from or "
                          "--index")
    return job, model_id, dets


def _identity(job: ScanJob, model_id: dict) -> dict:
    """What a rerun into the same folder must match."""
    return {"model": model_id["sha256"],
            "detectors": [job.settings[name] for name, _ in job.detectors],
            "thresholds": job.thresholds, "explain": job.explain,
            "input": job.plan.digest(), "index": verdict_identity(job.verdict)}


def _manifest(job: ScanJob, model_id: dict, shard_size: int) -> dict:
    return {"format": FORMAT, "identity": _identity(job, model_id), "model": model_id,
            "detectors": job.settings, "thresholds": job.thresholds, "verdict": job.verdict,
            "input": job.plan.identity(), "n_prompts": job.plan.total,
            "n_shards": len(job.plan.shards), "shard_size": shard_size,
            "columns": SCHEMA.names}


def _prepare_folder(out: Path, manifest: dict) -> None:
    """Refuse another scan's folder; remove half-written shards; write the manifest once."""
    check_manifest(out, manifest)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".shard-*.tmp"):
        stale.unlink()
    if not (out / MANIFEST).exists():
        write_json(out / MANIFEST, manifest)


def _score_pending(job: ScanJob, pending: list[Shard], cfg: ScanConfig, *, initial: int) -> None:
    """Score and write the ``pending`` shards on ``cfg.engine``, with a progress bar."""
    import torch

    bar = _progress_bar(job.plan.total, initial, cfg.progress)
    own_threads = torch.get_num_threads()
    try:
        if pending and cfg.engine == "local":
            scorer = ShardScorer(job)  # sets this process's torch threads to job.threads
            for s in pending:
                bar.update(scorer.run_shard(s))
        elif pending:
            from diffmem.scale.ray_engine import run_scan_on_ray

            run_scan_on_ray(job, pending, bar, workers=cfg.workers, address=cfg.address,
                            scorer=ShardScorer)
    finally:
        torch.set_num_threads(own_threads)
        bar.close()


def _thresholds(dets, adapter, threshold, threshold_from, old: dict | None
                ) -> dict[str, float | None]:
    """Each detector's threshold (``adapter()``: the driver's model, loaded when needed)."""
    names = [d.name for d in dets]
    if threshold is not None:
        return {names[0]: float(threshold)}
    if old and sorted(old.get("thresholds", {})) == sorted(names) and threshold_from is None:
        return dict(old["thresholds"])  # a resumed scan keeps its calibration
    adapter = adapter()
    if threshold_from is not None:
        from diffmem.detect.prompts import read_prompts

        clean = read_prompts(threshold_from)
        return {d.name: float(d.fit(adapter, clean).threshold_) for d in dets}
    from diffmem.detect.calibration import calibrated_threshold

    return {d.name: calibrated_threshold(adapter, d) for d in dets}


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="prompt", desc="scan", disable=not enabled,
                smoothing=0.1)



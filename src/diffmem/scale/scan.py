"""Scan a prompt log of any size with one or more detectors, locally or on a Ray cluster, resumably.

CLI: ``diffmem scan PROMPTS --out DIR [--engine local|ray] [--address ADDR] [--workers N]
[--detector NAME ...] [--threshold T | --threshold-from CLEAN] [--explain]`` (docs/scan.md).

The prompts (:mod:`diffmem.scale.stream`) are cut into shards of ``shard_size``; each shard is
scored by one worker holding the model (:class:`ShardScorer`) and written as one Parquet file
``shard-NNNNNN.parquet`` with one row per prompt and detector: ``prompt_id, prompt, source,
detector, score, threshold, decision, settings, explanation``. A shard file is written to a
temporary name and renamed when complete, so a shard is either entirely there or not at all: a
rerun after a kill skips the shards that exist and redoes the others, and a worker that finds its
shard already written (a retried task) does not write it again.

``manifest.json`` records what the scan is (model fingerprint, detectors and their settings,
thresholds, the input files with sizes and times, the shard size); a rerun into a folder holding
another scan's manifest is refused. At the end ``summary.json`` and ``scores.png`` (score histogram
per detector) are written from the shard files.

Engines: ``local`` scores the shards one after the other in this process; ``ray`` runs Ray Data
``map_batches`` over the pending shards with a pool of ``workers`` actors, each loading the model
once (``num_gpus=1`` per actor when the cluster has GPUs, else ``threads`` CPU threads each). Both
engines call the same :meth:`ShardScorer.run_shard` on the same shards with the same seeds, so
their scores are the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from diffmem.runtime.defaults import SAMPLING
from diffmem.runtime.errors import ConfigError, DiffmemError
from diffmem.scale.stream import Shard, ShardPlan, plan_shards, read_shard

MANIFEST = "manifest.json"
FORMAT = 1
#: fault injection for tests of worker recovery: ``MARKER:before`` / ``MARKER:after`` makes the
#: first shard scored after MARKER is absent create MARKER and kill its process (``os._exit``)
#: before / after writing the shard file
CRASH_ENV = "DIFFMEM_SCAN_CRASH_ONCE"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.parquet"


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
    crash: str | None = None
    settings: dict[str, dict] = field(default_factory=dict)


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
        self.out = Path(job.out)

    def run_shard(self, shard: Shard) -> int:
        """Score and write ``shard`` unless its file exists; returns its prompt count."""
        path = self.out / shard_name(shard.index)
        if path.exists():
            return shard.count
        records = read_shard(self.job.plan, shard)
        table = self.score_records(records)
        _maybe_crash(self.job.crash, "before")
        tmp = self.out / f".{path.name}.{uuid.uuid4().hex}.tmp"
        import pyarrow.parquet as pq

        pq.write_table(table, tmp)
        os.replace(tmp, path)
        _maybe_crash(self.job.crash, "after")
        return len(records)

    def score_records(self, records) -> object:
        import pyarrow as pa

        prompts = [r.prompt for r in records]
        cols: dict[str, list] = {k: [] for k in SCHEMA.names}
        for det in self.detectors:
            scores = det.score(self.adapter, prompts)
            thr = self.job.thresholds.get(det.name)
            flags = [None if thr is None else bool(s > thr) for s in scores]
            explanations = self._explain(det, prompts, flags)
            settings = json.dumps(self.job.settings.get(det.name) or _plain_settings(det),
                                  sort_keys=True)
            for r, s, f, e in zip(records, scores, flags, explanations, strict=True):
                cols["prompt_id"].append(r.prompt_id)
                cols["prompt"].append(r.prompt)
                cols["source"].append(r.source)
                cols["detector"].append(det.name)
                cols["score"].append(float(s))
                cols["threshold"].append(thr)
                cols["decision"].append(f)
                cols["settings"].append(settings)
                cols["explanation"].append(e)
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


def _schema():
    import pyarrow as pa

    return pa.schema([("prompt_id", pa.string()), ("prompt", pa.string()),
                      ("source", pa.string()), ("detector", pa.string()),
                      ("score", pa.float64()), ("threshold", pa.float64()),
                      ("decision", pa.bool_()), ("settings", pa.string()),
                      ("explanation", pa.string())])


SCHEMA = _schema()


def _maybe_crash(spec: str | None, when: str) -> None:
    if not spec:
        return
    marker, _, at = spec.rpartition(":")
    if at == when and marker and not Path(marker).exists():
        Path(marker).write_text(str(os.getpid()))
        os._exit(17)


# ----------------------------------------------------------------------------- identity


def model_fingerprint(model: str | Path) -> dict:
    """Identity of a pipeline folder (or ``"testbed"``) without loading it: a hash of its config
    files and of the size and first MiB of every weight file."""
    if str(model) == "testbed":
        from diffmem.testbed import testbed_path

        model = testbed_path()
    root = Path(model)
    if not root.is_dir():
        from diffmem.runtime.errors import ModelLoadError

        raise ModelLoadError(f"model {model} is not a pipeline folder")
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        rel = str(p.relative_to(root))
        size = p.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with p.open("rb") as f:
            h.update(f.read(1 << 20))
    return {"path": str(root.resolve()), "sha256": h.hexdigest()[:20]}


def _identity(job: ScanJob, model_id: dict) -> dict:
    return {"model": model_id["sha256"],
            "detectors": [job.settings[name] for name, _ in job.detectors],
            "thresholds": job.thresholds, "explain": job.explain,
            "input": job.plan.digest()}


def _check_manifest(out: Path, manifest: dict) -> None:
    path = out / MANIFEST
    if not path.exists():
        if any(out.glob("shard-*.parquet")):
            raise ConfigError(f"{out} holds shard files but no {MANIFEST}; scan into a new folder")
        return
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); scan into a new folder") from e
    mine, theirs = manifest["identity"], old.get("identity", {})
    for key, what in (("model", "model"), ("detectors", "detector or detector settings"),
                      ("thresholds", "threshold"), ("explain", "--explain setting"),
                      ("input", "prompt input (files changed, other columns or shard size)")):
        if mine.get(key) != theirs.get(key):
            raise ConfigError(f"{out} holds another scan's manifest (another {what}); use a new "
                              f"--out folder or rerun with that scan's settings")


# ----------------------------------------------------------------------------- the scan


def scan(prompts: str | Path, out: str | Path, *, model: str | Path = "testbed",
         detectors: Sequence[str] = ("noise_magnitude",), engine: str = "local",
         address: str | None = None, workers: int = 1, threads: int | None = None,
         shard_size: int = 1024, prompt_column: str | None = None, id_column: str | None = None,
         threshold: float | None = None, threshold_from: str | Path | None = None,
         fpr: float = 0.01, explain: bool = False, steps: int | str | None = None,
         generations: int = 1, num_inference_steps: int = SAMPLING.steps,
         guidance_scale: float = SAMPLING.guidance_scale,
         scheduler: str | None = None, batch_size: int = 16, seed: int = 0,
         device: str | None = None, progress: bool = False) -> dict:
    """Score every prompt of ``prompts`` into the scan folder ``out``; resumes a killed scan.

    ``threshold`` (one detector) or ``threshold_from`` (clean prompts, calibrated at ``fpr``) set
    each prompt's ``decision = score > threshold``; without either, a testbed model is calibrated
    on its held-out prompts and other models get no decision (null). ``explain`` adds the top
    words of each flagged prompt. Returns the summary (also ``out/summary.json``).
    """
    from diffmem.detect.registry import make_detector, parse_steps

    if engine not in ("local", "ray"):
        raise ConfigError(f"unknown engine {engine!r}; use 'local' or 'ray'")
    if workers < 1:
        raise ConfigError("--workers must be >= 1")
    detectors = list(dict.fromkeys(detectors))
    if not detectors:
        raise ConfigError("give at least one detector")
    if threshold is not None and len(detectors) > 1:
        raise ConfigError("--threshold applies to one detector; use --threshold-from with several")
    options = {"steps": parse_steps(steps), "generations": generations, "fpr": fpr,
               "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
               "scheduler": scheduler, "batch_size": batch_size, "seed": seed}
    options = {k: v for k, v in options.items() if v is not None}
    dets = [make_detector(name, **options) for name in detectors]
    names = [d.name for d in dets]
    out = Path(out)
    plan = plan_shards(prompts, shard_size, prompt_column=prompt_column, id_column=id_column)
    model_id = model_fingerprint(model)
    job = ScanJob(model=model_id["path"], detectors=[(n, options) for n in names],
                  thresholds={}, out=str(out), plan=plan, explain=explain, device=device,
                  threads=threads or 1, crash=os.environ.get(CRASH_ENV),
                  settings={d.name: _plain_settings(d) for d in dets})
    old = _read_manifest(out)
    job.thresholds = _thresholds(dets, model_id["path"], threshold, threshold_from, old,
                                 scheduler=scheduler, device=device)
    if explain and any(v is None for v in job.thresholds.values()):
        raise ConfigError("--explain needs a threshold: pass --threshold or --threshold-from")
    manifest = {"format": FORMAT, "identity": _identity(job, model_id), "model": model_id,
                "detectors": job.settings, "thresholds": job.thresholds,
                "input": plan.identity(), "n_prompts": plan.total, "n_shards": len(plan.shards),
                "shard_size": shard_size, "columns": SCHEMA.names}
    _check_manifest(out, manifest)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".shard-*.tmp"):
        stale.unlink()
    if not (out / MANIFEST).exists():
        _write_json(out / MANIFEST, manifest)
    done = {s.index for s in plan.shards if (out / shard_name(s.index)).exists()}
    pending = [s for s in plan.shards if s.index not in done]
    bar = _progress_bar(plan.total, sum(s.count for s in plan.shards if s.index in done),
                        progress)
    t0 = time.perf_counter()
    import torch

    own_threads = torch.get_num_threads()
    try:
        if pending and engine == "local":
            scorer = ShardScorer(job)  # sets this process's torch threads to job.threads
            for s in pending:
                bar.update(scorer.run_shard(s))
        elif pending:
            from diffmem.scale.ray_engine import run_scan_on_ray

            run_scan_on_ray(job, pending, bar, workers=workers, address=address)
    finally:
        torch.set_num_threads(own_threads)
        bar.close()
    elapsed = time.perf_counter() - t0
    summary = summarize(out, plan, names)
    summary.update(engine=engine, workers=workers if engine == "ray" else 1,
                   resumed_shards=len(done), scored_shards=len(pending),
                   scored_prompts=sum(s.count for s in pending), seconds=round(elapsed, 3),
                   prompts_per_s=(round(sum(s.count for s in pending) / elapsed, 3)
                                  if pending and elapsed > 0 else None))
    _write_json(out / "summary.json", summary)
    return summary


def _read_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _thresholds(dets, model: str, threshold, threshold_from, old: dict | None, *,
                scheduler, device) -> dict[str, float | None]:
    names = [d.name for d in dets]
    if threshold is not None:
        return {names[0]: float(threshold)}
    if old and sorted(old.get("thresholds", {})) == sorted(names) and threshold_from is None:
        return dict(old["thresholds"])  # a resumed scan keeps its calibration
    from diffmem.models.adapter import load_adapter

    adapter = load_adapter(model, scheduler=scheduler, device=device)
    if threshold_from is not None:
        from diffmem.detect.prompts import read_prompts

        clean = read_prompts(threshold_from)
        return {d.name: float(d.fit(adapter, clean).threshold_) for d in dets}
    from diffmem.explain import calibrate_threshold

    return {d.name: calibrate_threshold(adapter, d) for d in dets}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="prompt", desc="scan", disable=not enabled,
                smoothing=0.1)


# ----------------------------------------------------------------------------- summary


def summarize(out: str | Path, plan: ShardPlan, detectors: Sequence[str]) -> dict:
    """Counts, flagged share and score quantiles per detector from the shard files; checks that
    every shard is there once with its prompts; draws ``scores.png``."""
    import numpy as np
    import pyarrow.parquet as pq

    out = Path(out)
    per: dict[str, dict] = {}
    scores: dict[str, list] = {d: [] for d in detectors}
    flags: dict[str, list] = {d: [] for d in detectors}
    for s in plan.shards:
        path = out / shard_name(s.index)
        if not path.exists():
            raise DiffmemError(f"{path} is missing after the scan")
        t = pq.read_table(path, columns=["detector", "score", "decision"]).to_pydict()
        if len(t["score"]) != s.count * len(detectors):
            raise DiffmemError(f"{path} has {len(t['score'])} rows, expected "
                               f"{s.count} prompts x {len(detectors)} detectors")
        for d, sc, f in zip(t["detector"], t["score"], t["decision"], strict=True):
            scores[d].append(sc)
            flags[d].append(f)
    for d in detectors:
        x = np.asarray(scores[d], dtype=float)
        decided = [f for f in flags[d] if f is not None]
        n_flag = int(sum(decided))
        per[d] = {"n_prompts": int(x.size), "n_flagged": n_flag if decided else None,
                  "flagged_share": (n_flag / len(decided)) if decided else None,
                  "score_quantiles": {q: float(np.quantile(x, float(q))) for q in
                                      ("0.0", "0.5", "0.9", "0.99", "1.0")} if x.size else {}}
    _histogram(out / "scores.png", scores, _thresholds_of(out))
    return {"out": str(out), "n_prompts": plan.total, "n_shards": len(plan.shards),
            "detectors": per, "histogram": str(out / "scores.png")}


def _thresholds_of(out: Path) -> dict:
    m = _read_manifest(out) or {}
    return m.get("thresholds", {})


def _histogram(path: Path, scores: dict[str, list], thresholds: dict) -> None:
    from matplotlib.figure import Figure  # no pyplot: a user's backend is left alone

    fig = Figure(figsize=(5 * len(scores), 3.5))
    axes = fig.subplots(1, len(scores), squeeze=False)
    for ax, (name, x) in zip(axes[0], scores.items(), strict=True):
        ax.hist(x, bins=50, color="tab:blue")
        thr = thresholds.get(name)
        if thr is not None:
            ax.axvline(thr, color="tab:red", linestyle="--", label=f"threshold {thr:.3g}")
            ax.legend()
        ax.set_title(f"{name} ({len(x)} prompts)")
        ax.set_xlabel("score (higher = more memorized)")
        ax.set_ylabel("prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=100)

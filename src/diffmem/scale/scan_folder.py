"""The folder of a scan (:mod:`diffmem.scale.scan`): shard file names and columns, the manifest that
says which scan the folder holds, atomic JSON writes, and the summary read back from the shard files."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

from diffmem.runtime.errors import ConfigError, DiffmemError
from diffmem.scale.stream import ShardPlan

MANIFEST = "manifest.json"


def _schema():
    import pyarrow as pa

    return pa.schema([("prompt_id", pa.string()), ("prompt", pa.string()),
                      ("source", pa.string()), ("detector", pa.string()),
                      ("score", pa.float64()), ("threshold", pa.float64()),
                      ("decision", pa.bool_()), ("estimate", pa.bool_()),
                      ("verdict_source", pa.string()), ("verdict", pa.string()),
                      ("settings", pa.string()), ("explanation", pa.string())])


#: the columns of a shard file (docs/scan.md, "Output")
SCHEMA = _schema()


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.parquet"


# ----------------------------------------------------------------------------- manifest


def model_fingerprint(model: str | Path) -> dict:
    """Identity of a pipeline folder (or a named model, ``"testbed"``) without loading it: a hash
    of its config files and of the size and first MiB of every weight file."""
    from diffmem.models.profile import named_model

    root = named_model(str(model)) or Path(model)  # "testbed", "testbed-graded": shipped folders
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


def check_manifest(out: Path, manifest: dict) -> None:
    path = out / MANIFEST
    if not path.exists():
        if any(out.glob("shard-*.parquet")):
            raise ConfigError(f"{out} holds shard files but no {MANIFEST}; scan into a new folder")
        return
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); scan into a new folder") from e
    if old.get("format", 1) != manifest["format"]:
        raise ConfigError(f"{out} holds a scan of another format (version {old.get('format', 1)}, "
                          f"this diffmem writes {manifest['format']}); scan into a new folder")
    mine, theirs = manifest["identity"], old.get("identity", {})
    for key, what in (("model", "model"), ("detectors", "detector or detector settings"),
                      ("thresholds", "threshold"), ("explain", "--explain setting"),
                      ("input", "prompt input (files changed, other columns or shard size)"),
                      ("index", "training index or verdict setting (--index, --no-index)")):
        if mine.get(key) != theirs.get(key):
            raise ConfigError(f"{out} holds another scan's manifest (another {what}); use a new "
                              f"--out folder or rerun with that scan's settings")


def read_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


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
    estimates: dict[str, list] = {d: [] for d in detectors}
    for s in plan.shards:
        path = out / shard_name(s.index)
        if not path.exists():
            raise DiffmemError(f"{path} is missing after the scan")
        t = pq.read_table(path, columns=["detector", "score", "decision", "estimate"]).to_pydict()
        if len(t["score"]) != s.count * len(detectors):
            raise DiffmemError(f"{path} has {len(t['score'])} rows, expected "
                               f"{s.count} prompts x {len(detectors)} detectors")
        for d, sc, f, e in zip(t["detector"], t["score"], t["decision"], t["estimate"],
                               strict=True):
            scores[d].append(sc)
            flags[d].append(f)
            estimates[d].append(e)
    for d in detectors:
        x = np.asarray(scores[d], dtype=float)
        decided = [f for f in flags[d] if f is not None]
        n_flag = int(sum(decided))
        estimated = [e for e in estimates[d] if e is not None]
        per[d] = {"n_prompts": int(x.size), "n_flagged": n_flag if decided else None,
                  "flagged_share": (n_flag / len(decided)) if decided else None,
                  "n_estimate_flagged": int(sum(estimated)) if estimated else None,
                  "score_quantiles": {q: float(np.quantile(x, float(q))) for q in
                                      ("0.0", "0.5", "0.9", "0.99", "1.0")} if x.size else {}}
    _histogram(out / "scores.png", scores, _thresholds_of(out))
    return {"out": str(out), "n_prompts": plan.total, "n_shards": len(plan.shards),
            "detectors": per, "histogram": str(out / "scores.png")}


def _thresholds_of(out: Path) -> dict:
    m = read_manifest(out) or {}
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

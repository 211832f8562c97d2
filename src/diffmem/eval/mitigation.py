"""What each inference-time mitigation buys on the testbed, judged by the generated images.

For every method spec and strength, the harness generates ``seeds`` images per prompt of three
groups of the testbed's labelled prompts and measures, per group:

- memorization rate: share of images that copy a training image by the testbed criterion (tiled
  L2, grid 4, to the VAE round trip of the nearest training image < 0.15; docs/testbed.md), and the
  share with SSCD cosine > 0.5 to that image beside it;
- distance to the nearest training image: mean and 5th percentile (the closest images) of the tiled
  L2, and SSCD mean / 95th percentile;
- text alignment: the testbed attribute probe's mean probability of the (colour, shape) pairs the
  prompt names (``mixed`` prompts: a memorized trigger phrase plus named shapes, and held-out
  compositions);
- quality: FPD (Fréchet distance of attribute-probe features) of the held-out generations against
  rendered generic training images;
- the share of held-out images whose pixels differ from plain generation at all (``auto`` gating
  must leave them bit-identical), and seconds per image against plain generation in the same run.

Groups: ``memorized`` (verbatim + template prompts), ``mixed`` and ``heldout`` (never trained on).
Image ``s`` of every prompt uses generator seed ``s``, as :func:`diffmem.testbed.verify.verify_testbed`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffmem.core.sampling import sample, seeded_generators
from diffmem.models.adapter import load_adapter
from diffmem.runtime.defaults import SAMPLING
from diffmem.runtime.errors import ConfigError, DiffmemError
from diffmem.testbed import require_spec

GROUPS = ("memorized", "mixed", "heldout")
SSCD_COPY = 0.5


@dataclass
class _Images:
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    jobs: list[tuple[int, int]]  # (prompt index, seed)
    seconds: float
    records: list[dict]  # per image: what the mitigation did


def mixed_prompts(testbed, n_per_item: int = 2, seed: int = 0) -> list:
    """A memorized trigger phrase plus named shapes and colours: "<memorized caption> with a red
    circle and a blue square" (alignment on memorized prompts; issue 11)."""
    from diffmem.testbed.data import COLORS, SHAPES, LabelledPrompt

    rng = np.random.default_rng(seed)
    out = []
    for p in testbed.prompts:
        if not p.memorized:
            continue
        for _ in range(n_per_item):
            c1, c2 = rng.choice(list(COLORS), 2, replace=False)
            s1, s2 = rng.choice(list(SHAPES), 2, replace=False)
            out.append(LabelledPrompt(f"{p.prompt} with a {c1} {s1} and a {c2} {s2}", "mixed",
                                      list(p.image_ids), list(p.trigger_tokens)))
    return out


def _broad_mixed(adapter) -> list:
    """The shipped testbed's generation-labelled "mixed" prompts (docs/testbed.md) that copy a
    training image in plain generation; empty for other models."""
    from diffmem.testbed import labels_of
    from diffmem.testbed.broad import read_broad_labels
    from diffmem.testbed.data import LabelledPrompt

    labels = labels_of(adapter)
    if labels is None:
        return []
    return [LabelledPrompt(r["prompt"], "mixed", [], list(r.get("trigger_tokens") or []))
            for r in read_broad_labels(labels) if r["group"] == "mixed" and r["memorized"]]


def _groups(adapter, max_per_group: int | None, seed: int) -> dict[str, list]:
    from diffmem.testbed.data import build_testbed

    testbed = build_testbed(require_spec(adapter, "eval mitigation"))
    groups = {
        "memorized": [p for p in testbed.prompts if p.memorized],
        "mixed": _broad_mixed(adapter) or mixed_prompts(testbed),
        "heldout": [p for p in testbed.prompts if p.kind == "heldout"],
    }
    if max_per_group:
        rng = np.random.default_rng(seed)
        for g, ps in groups.items():
            if len(ps) > max_per_group:
                keep = sorted(rng.choice(len(ps), max_per_group, replace=False))
                groups[g] = [ps[i] for i in keep]
    return groups, testbed


def _generate(adapter, prompts: Sequence[str], hooks_factory, *, seeds: int, steps: int,
              guidance_scale: float, batch_size: int, desc: str) -> _Images:
    jobs = [(i, s) for i in range(len(prompts)) for s in range(seeds)]
    images, records, seconds = [], [], 0.0
    for k in tqdm(range(0, len(jobs), batch_size), desc=desc, unit="batch", leave=False):
        chunk = jobs[k : k + batch_size]
        hooks = hooks_factory()
        t0 = time.perf_counter()
        res = sample(adapter, [prompts[i] for i, _ in chunk], num_inference_steps=steps,
                     guidance_scale=guidance_scale, hooks=hooks,
                     generator=seeded_generators([s for _, s in chunk], adapter.device))
        seconds += time.perf_counter() - t0
        images.append(res.images.float().clamp(-1, 1).cpu())
        per = [{} for _ in chunk]
        for name, rows in res.records.items():
            if name.startswith("mitigation.") and isinstance(rows, list):
                for j, row in enumerate(rows):
                    per[j][name.removeprefix("mitigation.")] = row
        records.extend(per)
    return _Images(torch.cat(images), jobs, seconds, records)


class _Judge:
    """The testbed criterion and the side metrics, with the training images loaded once."""

    def __init__(self, adapter, testbed, *, with_sscd: bool, probe=None) -> None:
        from diffmem.eval.quality import ProbeFeatures
        from diffmem.testbed.verify import (
            REPLICATION_THRESHOLD,
            TILE_GRID,
            training_images,
            vae_roundtrip,
        )

        originals, self.ids = training_images(testbed)
        self.refs = vae_roundtrip(adapter, originals)
        self.threshold, self.grid = REPLICATION_THRESHOLD, TILE_GRID
        self.features = ProbeFeatures(probe)
        generic = [i for i, x in enumerate(self.ids) if x.startswith("generic")]
        self.real_features = self.features(originals[generic])
        self.probe = self.features.probe
        self.sscd = None
        if with_sscd:
            from diffmem.similarity.sscd import SSCD

            # a model with an SSCD low-pass (the graded testbed) is judged against the original
            # pixels, else against the VAE rendering, as tiled L2 (docs/testbed.md)
            lowpass = adapter.profile.sscd_lowpass
            self.sscd = SSCD(lowpass=lowpass)
            self.sscd_refs = originals if lowpass else self.refs

    def __call__(self, gen: _Images, prompts: list, group: str) -> dict:
        from diffmem.eval.alignment import attribute_alignment
        from diffmem.eval.quality import frechet_distance
        from diffmem.similarity.pixel import nearest_tiled_l2

        dist, nn = nearest_tiled_l2(gen.images, self.refs, grid=self.grid)
        copied = dist < self.threshold
        row = {
            "group": group, "n_prompts": len(prompts), "n_images": len(gen.jobs),
            "memorization_rate": float(copied.float().mean()),
            "distance_mean": float(dist.mean()),
            "distance_p5": float(np.percentile(dist.numpy(), 5)),
            "seconds_per_image": gen.seconds / max(len(gen.jobs), 1),
        }
        if self.sscd is not None:
            sim = (self.sscd.embed(gen.images) * self.sscd.embed(self.sscd_refs[nn])).sum(-1)
            sim = torch.as_tensor(sim).float()
            row.update(sscd_rate=float((sim > SSCD_COPY).float().mean()),
                       sscd_mean=float(sim.mean()),
                       sscd_p95=float(np.percentile(sim.numpy(), 95)))
        captions = [prompts[i].prompt for i, _ in gen.jobs]
        align = attribute_alignment(gen.images, captions, probe=self.probe)
        ok = ~torch.isnan(align)
        row["alignment"] = float(align[ok].mean()) if bool(ok.any()) else None
        if group == "heldout":
            row["fpd"] = float(frechet_distance(self.real_features, self.features(gen.images)))
        row["applied_share"] = float(np.mean([
            any(r.get("applied", False) for r in rec.values()) for rec in gen.records
        ])) if gen.records and any(gen.records) else 0.0
        # prompts a method could not mitigate and left plain (reanchor without a clearing edit)
        row["unmitigated_share"] = float(np.mean([
            any(r.get("reason") == "no clearing edit" for r in rec.values())
            for rec in gen.records])) if gen.records else 0.0
        return row


def _configs(methods: Sequence[str], strengths: Sequence[float] | None) -> list[tuple[str, str]]:
    """(label, spec) per run: ``ren+amg`` composes; ``--strengths`` multiplies every method."""
    out = []
    for m in methods:
        names = [x for x in m.split("+") if x]
        if not names:
            raise ConfigError(f"empty method in {list(methods)!r}")
        if strengths and not any(":" in x for x in names) and names != ["auto"]:
            for s in strengths:
                out.append((f"{m}@{s:g}", ",".join(f"{x}:{s:g}" if x != "auto" else x
                                                   for x in names)))
        else:
            out.append((m, ",".join(names)))
    return out


def evaluate_mitigation(methods: Sequence[str], *, model="testbed",
                        strengths: Sequence[float] | None = None, seeds: int = 4,
                        steps: int = SAMPLING.steps, guidance_scale: float = SAMPLING.guidance_scale,
                        index=None,
                        threshold: float | None = None, max_per_group: int | None = None,
                        with_sscd: bool = True, batch_size: int = 64, seed: int = 0,
                        out: str | Path | None = None, plot: str | Path | None = None) -> dict:
    """Measure each method (``"ren"``, ``"ren+amg"`` composes, ``"auto"`` gates) against plain
    generation on the testbed; see the module docstring for the metrics. Writes ``out`` (JSON,
    rewritten after each method so that finished work is kept) and ``plot`` (trade-off PNG)."""
    from diffmem.mitigate import MitigationContext, build_mitigations, parse_spec

    adapter = load_adapter(model)
    groups, testbed = _groups(adapter, max_per_group, seed)
    configs = _configs(methods, strengths)
    for _, spec in configs:
        parse_spec(spec)  # every spec checked before any work
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    from diffmem.similarity.index import load_index

    index = load_index(index, what="eval mitigation")
    # a prompt a method cannot mitigate (reanchor: no clearing edit) keeps plain generation and is
    # counted (applied_share, unmitigated) instead of failing the method's whole row
    context = MitigationContext(adapter, threshold=threshold, index=index, seed=seed,
                                unclearable="plain")
    judge = _Judge(adapter, testbed, with_sscd=with_sscd)
    report: dict = {"model": str(adapter.path), "seeds": seeds, "steps": steps,
                    "guidance_scale": guidance_scale, "criterion": (
                        f"tiled_l2(grid={judge.grid}) to the nearest training image's VAE round trip "
                        f"< {judge.threshold}; SSCD > {SSCD_COPY} beside it"),
                    "groups": {g: len(ps) for g, ps in groups.items()}, "rows": []}
    plain: dict[str, _Images] = {}
    for label, spec in [("plain", None), *configs]:
        if spec is not None:
            build_mitigations(spec, context)  # fails fast (index, threshold) before generating
        for group, prompts in groups.items():
            texts = [p.prompt for p in prompts]
            factory = (lambda: []) if spec is None else (lambda s=spec: build_mitigations(s, context))
            try:
                gen = _generate(adapter, texts, factory, seeds=seeds, steps=steps,
                                guidance_scale=guidance_scale, batch_size=batch_size,
                                desc=f"{label}/{group}")
            except DiffmemError as e:
                if spec is None:
                    raise
                # a method that refuses some prompts (e.g. reanchor without a clearing edit)
                # gets a row saying so; the other methods are still measured
                report["rows"].append({"method": label, "spec": spec, "group": group,
                                       "error": str(e)})
                continue
            row = {"method": label, "spec": spec or "none", **judge(gen, prompts, group)}
            if spec is None:
                plain[group] = gen
                row["time_ratio"] = 1.0
                row["changed_share"] = 0.0
            else:
                base = plain[group]
                row["time_ratio"] = gen.seconds / max(base.seconds, 1e-9)
                row["changed_share"] = float(
                    (gen.images != base.images).flatten(1).any(1).float().mean())
            report["rows"].append(row)
        if context.threshold is not None:
            report["threshold"] = context.threshold
        if out is not None:
            from diffmem.runtime.jsonio import write_json

            write_json(out, _finite(report))
    if plot is not None:
        plot_tradeoff(report, plot)
    return _finite(report)


def _finite(obj):
    """Strict JSON: NaN/inf -> None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def plot_tradeoff(report: dict, path: str | Path) -> Path:
    """Memorization rate of memorized prompts against alignment on mixed prompts, one point per
    method and strength."""
    from matplotlib.figure import Figure

    rows = {(r["method"], r["group"]): r for r in report["rows"] if "error" not in r}
    methods = list(dict.fromkeys(r["method"] for r in report["rows"]))
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.subplots()
    for m in methods:
        mem, mix = rows.get((m, "memorized")), rows.get((m, "mixed"))
        if mem is None or mix is None or mix.get("alignment") is None:
            continue
        x, y = mem["memorization_rate"], mix["alignment"]
        ax.scatter([x], [y], s=40, marker="*" if m == "plain" else "o")
        ax.annotate(m, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("memorization rate, memorized prompts (testbed criterion)")
    ax.set_ylabel("attribute alignment, mixed prompts")
    ax.set_title("inference-time mitigation: copies vs. alignment", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path

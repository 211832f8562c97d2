"""What the closed-loop guard (``--mitigate auto``) serves, judged by the generated images.

For every generation-labelled group of the testbed's broad set (docs/testbed.md: training
captions, frames, contexts, long sentences, misspellings, synonyms, partial captions, mixed
prompts, clean controls) and one split (default ``test``, on which no default was chosen), the
harness generates ``seeds`` images per prompt (image ``s`` with seed ``s``, as the labels were
made) three ways: plain, guarded with the training index, guarded without it. It reports per group

- ``plain_copy_rate`` / ``served_copy_rate``: share of the images of copying prompts that copy a
  training image by the testbed criterion (tiled L2 < 0.15 to the VAE rendering of the nearest
  training image), plain and as the guard serves them;
- ``unresolved``: share of images the guard marked ``unresolved``; ``mitigated``: share it
  regenerated;
- ``bit_identical``: share of the images of non-copying prompts (clean controls, held-out prompts)
  equal to plain generation in every pixel;
- ``alignment_ratio`` (mixed prompts): attribute-probe alignment of the served images over plain;
- ``fpd`` (held-out prompts): Fréchet probe distance to generic training images, plain and served;
- ``cost``: seconds of the guard over seconds of plain generation of the same images, measured in
  the same process.

A hand-made prompt file (``hand_made``) is reported apart, labelled by its own plain generations.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from diffmem.core.sampling import sample, seeded_generators
from diffmem.models.adapter import load_adapter
from diffmem.runtime.defaults import SAMPLING
from diffmem.runtime.errors import ConfigError


def _batched(adapter, prompts: list[str], seeds: list[int], fn, batch_size: int):
    images, extra, seconds = [], [], 0.0
    for k in range(0, len(prompts), batch_size):
        t0 = time.perf_counter()
        imgs, more = fn(prompts[k : k + batch_size], seeds[k : k + batch_size])
        seconds += time.perf_counter() - t0
        images.append(imgs.float().clamp(-1, 1).cpu())
        extra.extend(more)
    return torch.cat(images), extra, seconds


def _prompt_sets(adapter, split: str, groups: Sequence[str] | None, max_per_group: int | None,
                 hand_made: str | Path | None) -> dict[str, list[dict]]:
    from diffmem.testbed import labels_of, require_spec
    from diffmem.testbed.broad import read_broad_labels
    from diffmem.testbed.locate import labelled_prompts

    labels = labels_of(adapter)
    if labels is None:
        raise ConfigError("eval guard needs a testbed with generation labels (the shipped testbed; "
                          "`diffmem testbed label` writes them for another)")
    rows = [r for r in read_broad_labels(labels) if split == "all" or r["split"] == split]
    sets: dict[str, list[dict]] = {}
    for r in rows:
        name = r["group"] if r["memorized"] else f"{r['group']}:no-copy"
        if r["group"] != "clean" and not r["memorized"]:
            continue  # a non-copying variant of a copying rule: neither positive nor control
        sets.setdefault(name, []).append({"prompt": r["prompt"], "copies": bool(r["memorized"])})
    spec = require_spec(adapter, "eval guard")
    sets["heldout"] = [{"prompt": p.prompt, "copies": False}
                       for p in labelled_prompts(spec, adapter.path) if p.kind == "heldout"]
    if groups:
        sets = {k: v for k, v in sets.items() if k in groups or k.split(":")[0] in groups}
    if max_per_group:
        sets = {k: v[:max_per_group] for k, v in sets.items()}
    if hand_made is not None:
        from diffmem.detect.prompts import read_prompts

        sets["hand-made"] = [{"prompt": p, "copies": None} for p in read_prompts(hand_made)]
    return sets


def evaluate_guard(model="testbed", *, index=None, split: str = "test", seeds: int = 4,
                   groups: Sequence[str] | None = None, max_per_group: int | None = None,
                   without_index: bool = True, hand_made: str | Path | None = None,
                   steps: int = SAMPLING.steps, guidance_scale: float = SAMPLING.guidance_scale,
                   batch_size: int = 32, scheduler: str | None = None, config=None,
                   out: str | Path | None = None) -> dict:
    """The report of the module docstring, as a dict (``rows``: one per group and setting),
    rewritten to ``out`` after every group (an interrupted run keeps the finished groups)."""
    from diffmem.eval.alignment import attribute_alignment
    from diffmem.eval.mitigation import _Judge
    from diffmem.eval.quality import frechet_distance
    from diffmem.mitigate.guard import Guard, GuardConfig
    from diffmem.runtime.jsonio import write_json
    from diffmem.similarity.index import load_index
    from diffmem.testbed import require_spec
    from diffmem.testbed.data import build_testbed

    adapter = load_adapter(model, scheduler=scheduler)
    index = load_index(index, what="eval guard")
    sets = _prompt_sets(adapter, split, groups, max_per_group, hand_made)
    judge = _Judge(adapter, build_testbed(require_spec(adapter, "eval guard")), with_sscd=False)
    config = config or GuardConfig()
    guards = {}
    if index is not None:
        guards["index"] = Guard(adapter, index=index, config=config)
    if without_index or index is None:
        # without the agreement check there is no reference for AMG: the ladder keeps the rest
        ladder = config.ladder if config.agreement else \
            (tuple(m for m in config.ladder if "amg" not in m) or ("ren",))
        guards["no-index"] = Guard(adapter, config=GuardConfig(**{**config.__dict__,
                                                                   "ladder": ladder}))
    batch_size = max(seeds, batch_size - batch_size % seeds)  # a prompt's images in one call
    kw = {"num_inference_steps": steps, "guidance_scale": guidance_scale}

    def plain(ps, ss):
        res = sample(adapter, ps, generator=seeded_generators(ss), **kw)
        return res.images, [None] * len(ps)

    report: dict = {"model": str(adapter.path), "split": split, "seeds": seeds, "steps": steps,
                    "criterion": f"tiled_l2 < {judge.threshold} to the nearest training image's "
                                 "VAE rendering", "config": config.__dict__, "rows": []}
    for group, items in sets.items():
        texts = [it["prompt"] for it in items for _ in range(seeds)]
        seed_list = [s for _ in items for s in range(seeds)]
        base, _, t_plain = _batched(adapter, texts, seed_list, plain, batch_size)
        dist_p, _ = _nearest(judge, base)
        copying = np.array([it["copies"] for it in items for _ in range(seeds)], dtype=object)
        if group == "hand-made":  # labelled by its own plain generations (any seed copies)
            per_prompt = (dist_p < judge.threshold).reshape(len(items), seeds).any(1)
            copying = np.repeat(per_prompt, seeds)
        copying = copying.astype(bool)
        for name, guard in guards.items():
            def guarded(ps, ss, guard=guard):
                out = guard.generate(ps, ss, **kw)
                return out.images, [v.to_json() for v in out.verdicts]

            served, verdicts, t_guard = _batched(adapter, texts, seed_list, guarded, batch_size)
            dist_s, _ = _nearest(judge, served)
            copied_s, copied_p = dist_s < judge.threshold, dist_p < judge.threshold
            status = np.array([v["status"] for v in verdicts])
            same = np.array([bool(torch.equal(a, b)) for a, b in zip(served, base, strict=True)])
            row = {"group": group, "setting": name, "n_prompts": len(items),
                   "n_images": len(texts), "n_copying_images": int(copying.sum()),
                   "plain_copy_rate": _rate(copied_p[copying]),
                   "served_copy_rate": _rate(copied_s[copying]),
                   "served_copy_rate_all": _rate(copied_s),
                   "unresolved": _rate(status == "unresolved"),
                   "mitigated": _rate(status != "clean"),
                   "bit_identical": _rate(same[~copying]) if bool((~copying).any()) else None,
                   "seconds_plain": round(t_plain, 2), "seconds_guard": round(t_guard, 2),
                   "cost": round(t_guard / max(t_plain, 1e-9), 3)}
            if group.startswith("mixed"):
                a_p = attribute_alignment(base, texts, probe=judge.probe)
                a_s = attribute_alignment(served, texts, probe=judge.probe)
                ok = ~(torch.isnan(a_p) | torch.isnan(a_s))
                if bool(ok.any()):
                    row["alignment_ratio"] = round(float(a_s[ok].mean() / a_p[ok].mean()), 4)
            if group == "heldout":
                fp = judge.features
                row["fpd_plain"] = float(frechet_distance(judge.real_features, fp(base)))
                row["fpd_served"] = float(frechet_distance(judge.real_features, fp(served)))
            report["rows"].append(row)
        if out is not None:
            write_json(out, report)
    return report


def _nearest(judge, images: torch.Tensor):
    from diffmem.similarity.pixel import nearest_tiled_l2

    dist, nn = nearest_tiled_l2(images, judge.refs, grid=judge.grid)
    return dist.numpy(), nn


def _rate(mask) -> float | None:
    mask = np.asarray(mask)
    return None if mask.size == 0 else round(float(mask.mean()), 4)

"""Cost of the closed-loop guard (``--mitigate auto``) against plain generation, measured in one
process on the shipped testbed: per image on clean prompts (the watch and the verification only)
and on copying prompts (watch, verification and the escalation tries), with and without the
training index (without it: one image per prompt, each with a probe image for the agreement check,
and 4 images per prompt compared with each other), and each part's share.

    OMP_NUM_THREADS=2 PYTHONPATH=src python bench/bench_guard.py --index runs/idx

Prints ratios of one run (best of ``--repeats`` for each setting).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from diffmem.core.sampling import sample, seeded_generators
from diffmem.mitigate.guard import Guard, GuardConfig
from diffmem.models.adapter import load_adapter
from diffmem.similarity.index import load_index
from diffmem.testbed import labels_of
from diffmem.testbed.broad import read_broad_labels


def _prompts(adapter, n: int) -> tuple[list[str], list[str]]:
    rows = read_broad_labels(labels_of(adapter))
    clean = [r["prompt"] for r in rows if r["group"] == "clean" and not r["memorized"]][:n]
    copying = [r["prompt"] for r in rows if r["memorized"] and r["copies"] == r["seeds"]][:n]
    return clean, copying


def _best(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", required=True)
    p.add_argument("--n", type=int, default=16, help="prompts per set (one image each)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--watch-every", type=int, default=GuardConfig().watch_every,
                   help="steps between the watch's replication checks (0: none)")
    a = p.parse_args()
    adapter = load_adapter("testbed")
    index = load_index(a.index, what="bench")
    clean, copying = _prompts(adapter, a.n)
    # one-time costs (the index's first search loads its arrays, the first run its kernels) are
    # paid before anything is timed
    warm = sample(adapter, clean[:2], generator=seeded_generators([0, 1]), num_inference_steps=2)
    index.search(warm.images.float().clamp(-1, 1), k=1)
    config = GuardConfig(watch_every=a.watch_every)
    # without the index: one image per prompt (each gets a probe image for the agreement check)
    # and 4 images per prompt of a quarter of the prompts (compared with each other, no probe)
    guards = {"index": Guard(adapter, index=index, config=config),
              "no-index": Guard(adapter, config=config)}
    out = {"threads": torch.get_num_threads(), "n": a.n, "watch_every": a.watch_every}
    sets = [("clean", clean, None), ("copying", copying, None),
            ("clean_x4", clean[: max(1, a.n // 4)], 4), ("copying_x4", copying[: max(1, a.n // 4)], 4)]
    for label, prompts, per in sets:
        seeds = list(range(len(prompts)))
        if per is not None:  # per images of every prompt, seeds 0..per-1, in one call
            prompts = [q for q in prompts for _ in range(per)]
            seeds = [s for _ in range(len(prompts) // per) for s in range(per)]
        t_plain, _ = _best(lambda ps=prompts, ss=seeds: sample(
            adapter, ps, generator=seeded_generators(ss)), a.repeats)
        out[f"{label}_plain_s_per_image"] = round(t_plain / len(prompts), 4)
        for name, guard in guards.items():
            if per is not None and name == "index":
                continue  # the index's watch does not depend on images per prompt
            t, res = _best(lambda g=guard, ps=prompts, ss=seeds: g.generate(ps, ss), a.repeats)
            timing = res.records["timing"]
            out[f"{label}_{name}_ratio"] = round(t / t_plain, 3)
            out[f"{label}_{name}_parts"] = {
                "watch": round(timing["watch"] / t_plain, 3),
                "verify": round(timing["verify"] / t_plain, 3),
                "agreement": round(timing.get("agreement", 0.0) / t_plain, 3),
                "tries": [{"method": x["method"], "images": x["images"],
                           "ratio": round(x["seconds"] / t_plain, 3)} for x in timing["tries"]]}
            out[f"{label}_{name}_statuses"] = {s: sum(v.status == s for v in res.verdicts)
                                               for s in ("clean", "mitigated", "unresolved")}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

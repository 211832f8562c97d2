"""Measure AMG's per-step replication detector on the testbed (docs/similarity.md figures).

    python bench/measure_stepwise.py [--n 8] [--every 5]

For the first N memorized and N held-out labelled prompts (seed 0 each, DDIM 50 steps): whether and
at which step StepwiseReplication fires, against the testbed's pixel index of VAE-rendered
training images with the default tiled-L2 schedule.
"""

from __future__ import annotations

import argparse

import numpy as np

from diffmem.core.sampling import sample, seeded_generators
from diffmem.detect.replication import StepwiseReplication
from diffmem.models.adapter import load_adapter
from diffmem.testbed import spec_of
from diffmem.testbed.data import build_testbed
from diffmem.testbed.index import build_testbed_index


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--every", type=int, default=5)
    a = ap.parse_args()
    adapter = load_adapter("testbed")
    tb = build_testbed(spec_of(adapter))
    index = build_testbed_index(spec=tb.spec, rendered_by=adapter)
    chosen = [p for p in tb.prompts if p.memorized][: a.n] + \
        [p for p in tb.prompts if not p.memorized][: a.n]
    det = StepwiseReplication(index, every=a.every)
    res = sample(adapter, [p.prompt for p in chosen], hooks=[det],
                 generator=seeded_generators([0] * len(chosen)))
    fired = res.records["stepwise_replication_fired_at"]
    for p, f, near in zip(chosen, fired, res.records["stepwise_replication_nearest"], strict=True):
        own = near in p.image_ids
        print(f"{p.kind:9s} fired_at={int(f):3d} nearest={near:14s} own={own!s:5s} {p.prompt[:50]}")
    mem = np.array([p.memorized for p in chosen])
    print(f"memorized fired: {np.mean(fired[mem] >= 0):.3f}, median step "
          f"{np.median(fired[mem][fired[mem] >= 0]) if (fired[mem] >= 0).any() else 'n/a'} of 50; "
          f"held-out fired: {np.mean(fired[~mem] >= 0):.3f}")


if __name__ == "__main__":
    main()

"""The guard on ``testbed-graded`` with its own index: the designed prompts of the items with >= 16
copies and 12 held-out prompts, 2 seeds each, plain vs served (copy = tiled L2 < 0.15).

    diffmem index build testbed-graded --out runs/idx_graded
    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/graded_guard.py runs/idx_graded
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import torch

from diffmem.core.sampling import sample, seeded_generators
from diffmem.mitigate.guard import Guard
from diffmem.models.adapter import load_adapter
from diffmem.models.profile import named_model
from diffmem.similarity.index import load_index
from diffmem.testbed import labelled_prompts, testbed_spec_of


def _dist(index, images) -> list[float]:
    return [float(x) for x in index.search(images.float().clamp(-1, 1), k=1).scores[:, 0]]


def main() -> None:
    torch.set_num_threads(1)
    adapter = load_adapter("testbed-graded")
    index = load_index(sys.argv[1], what="graded guard")
    folder = named_model("testbed-graded")
    prompts = labelled_prompts(testbed_spec_of(folder), folder)
    sets = {"duplicated>=16": [p for p in prompts if p.copies >= 16],
            "heldout": [p for p in prompts if p.kind == "heldout"][:12]}
    guard, out = Guard(adapter, index=index), {}
    for name, ps in sets.items():
        texts = [p.prompt for p in ps for _ in range(2)]
        seeds = [s for _ in ps for s in range(2)]
        copies = [p.copies for p in ps for _ in range(2)]
        plain_d, served_d, status, same = [], [], [], []
        for k in range(0, len(texts), 16):
            t, s = texts[k : k + 16], seeds[k : k + 16]
            plain = sample(adapter, t, generator=seeded_generators(s)).images
            res = guard.generate(t, s)
            plain_d += _dist(index, plain)
            served_d += _dist(index, res.images)
            status += [v.status for v in res.verdicts]
            same += [bool(torch.equal(a, b)) for a, b in zip(plain, res.images, strict=True)]
        per = collections.defaultdict(lambda: [0, 0, 0])
        for c, a, b in zip(copies, plain_d, served_d, strict=True):
            per[c][0] += 1
            per[c][1] += a < 0.15
            per[c][2] += b < 0.15
        n = len(texts)
        out[name] = {"images": n, "plain_copy_rate": sum(d < 0.15 for d in plain_d) / n,
                     "served_copy_rate": sum(d < 0.15 for d in served_d) / n,
                     "unresolved": status.count("unresolved") / n, "bit_identical": sum(same) / n,
                     "per_count": {c: {"images": m, "plain": p / m, "served": q / m}
                                   for c, (m, p, q) in sorted(per.items())}}
        print(name, json.dumps(out[name]))
    Path("runs").mkdir(exist_ok=True)
    Path("runs/graded_guard.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

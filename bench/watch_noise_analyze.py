"""Share of copying images a watch statistic flags at a given FPR on non-copying clean / held-out
images, per group: the first-step magnitude, the mean of the first k steps, and the max / mean of
per-step z-scores (per-step mean and spread of the non-copying images).

    python bench/watch_noise_analyze.py runs/watch/nm_dev.json
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    data = json.loads(Path(sys.argv[1]).read_text())
    neg = np.array([x["nm"] for x in data if not x["copy"] and x["group"] in ("clean", "heldout")])
    pos_rows = [x for x in data if x["copy"]]
    pos = np.array([x["nm"] for x in pos_rows])
    mu, sd = neg.mean(0), neg.std(0) + 1e-9

    def stats(a: np.ndarray, k: int) -> dict:
        z = (a - mu) / sd
        return {"s0": a[:, 0], f"mean{k}": a[:, :k].mean(1), f"zmax{k}": z[:, :k].max(1),
                f"zmean{k}": z[:, :k].mean(1)}

    for fpr in (0.01, 0.02, 0.03):
        print("FPR", fpr)
        for k in (1, 3, 5, 8, 12):
            sn, sp = stats(neg, k), stats(pos, k)
            for name in sn:
                if name == "s0" and k > 1:
                    continue
                thr = np.quantile(sn[name], 1 - fpr, method="higher")
                groups = collections.defaultdict(list)
                for row, hit in zip(pos_rows, sp[name] > thr, strict=True):
                    groups[row["group"]].append(hit)
                per = " ".join(f"{g[:5]}={np.mean(v):.2f}" for g, v in sorted(groups.items()))
                print(f"  k={k:2d} {name:8s} tpr={(sp[name] > thr).mean():.3f} | {per}")


if __name__ == "__main__":
    main()

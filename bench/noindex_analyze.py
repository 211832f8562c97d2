"""How well no-index signals separate copying images from clean ones (output of
bench/noindex_signals.py): per group, the share of copying images flagged at the threshold that
flags ``FPR`` of the non-copying clean-control and held-out images, for the first-step magnitude,
the cross-seed x0 agreement at each recorded step, and their OR.

    PYTHONPATH=src python bench/noindex_analyze.py runs/noindex/sig_dev.pt [FPR]
"""

from __future__ import annotations

import sys
from collections import defaultdict

import numpy as np
import torch


def agreement(x0: torch.Tensor, meta: list[dict]) -> np.ndarray:
    """(N, S): for each image and step, minus the smallest RMS distance of its x0 to the x0 of the
    other seeds of the same prompt (higher = the seeds agree = memorized)."""
    by = defaultdict(list)
    for i, m in enumerate(meta):
        by[m["prompt"]].append(i)
    out = np.full((len(meta), x0.shape[1]), -np.inf)
    x = x0.float()
    for idx in by.values():
        if len(idx) < 2:
            continue
        v = x[idx].flatten(2)  # (k, S, D)
        d = ((v[:, None] - v[None]) ** 2).mean(-1).sqrt()  # (k, k, S)
        d = d + torch.eye(len(idx))[..., None] * 1e9
        out[idx] = -d.min(1).values.numpy()
    return out


def main() -> None:
    data = torch.load(sys.argv[1])
    fpr = float(sys.argv[2]) if len(sys.argv) > 2 else 0.03
    meta, steps = data["meta"], data["steps"]
    copy = np.array([m["copy"] for m in meta])
    clean = np.array([(m["group"] in ("clean", "heldout")) and not m["copy"] for m in meta])
    sig = {"nm": data["nm"].numpy()}
    ag = agreement(data["x0"], meta)
    for k, s in enumerate(steps):
        sig[f"agree@{s}"] = ag[:, k]
    groups = sorted({m["group"] for m in meta})
    thr = {n: np.quantile(v[clean], 1 - fpr, method="higher") for n, v in sig.items()}
    flags = {n: v > thr[n] for n, v in sig.items()}
    print(f"clean images {clean.sum()}, copying {copy.sum()}, FPR {fpr}")
    print("signal".ljust(12), " ".join(g[:9].rjust(9) for g in groups), "  all")
    for n, f in flags.items():
        row = []
        for g in groups:
            m = copy & np.array([x["group"] == g for x in meta])
            row.append(f"{f[m].mean():9.3f}" if m.any() else " " * 9)
        print(n.ljust(12), " ".join(row), f"{f[copy].mean():.3f}")
    for s in steps:
        f = flags["nm"] | flags[f"agree@{s}"]
        fp = f[clean].mean()
        row = []
        for g in groups:
            m = copy & np.array([x["group"] == g for x in meta])
            row.append(f"{f[m].mean():9.3f}" if m.any() else " " * 9)
        print(f"nm|agree@{s}".ljust(12), " ".join(row), f"{f[copy].mean():.3f} fp {fp:.3f}")


if __name__ == "__main__":
    main()

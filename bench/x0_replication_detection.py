"""How early does the decoded x0 estimate reveal a copy? AMG's per-step replication check as a
prompt detector on the broad generation-labelled set (docs/detection.md, "Replication of the x0
estimate").

For every prompt of the broad set, ``--generations`` initial noises with seeds ``--seed``,
``--seed`` + 1, ... (away from the seeds 0-3 the labels were made with), DDIM 50 steps: at each
step of ``--check`` the clean-latent estimate is decoded and its nearest training image searched
in the testbed's pixel index (tiled L2, the labels' criterion family); the prompt's score is minus
the smallest (``min``) or the mean distance over its generations. Prints AUC and TPR at 1% FPR
overall and per group (group AUC / TPR@1%FPR against all non-copying prompts), like ``eval
detection``.

    diffmem index build testbed --out runs/idx
    OMP_NUM_THREADS=2 PYTHONPATH=src python bench/x0_replication_detection.py --index runs/idx \\
        --check 5,10,15,20,25 --generations 2 --seed 100
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from diffmem.core.sampling import Hook, sample, seeded_generators
from diffmem.eval.metrics import roc_auc_score, tpr_at_fpr
from diffmem.models.adapter import load_adapter
from diffmem.similarity.index import TrainingIndex
from diffmem.testbed.broad import read_broad_labels


class X0Distance(Hook):
    """Nearest-training-image distance of the decoded x0 estimate at the chosen steps."""

    name = "x0_distance"

    def __init__(self, index: TrainingIndex, steps: list[int]) -> None:
        self.index, self.steps = index, steps

    def last_step(self, run) -> int:
        return max(self.steps)

    def on_start(self, run) -> None:
        run.state(self).d = {}

    def on_step(self, run, step) -> None:
        if step.index in self.steps:
            with torch.no_grad():
                img = run.adapter.decode(step.x0).float().clamp(-1, 1).cpu()
            run.state(self).d[step.index] = self.index.search(img, k=1).scores[:, 0].numpy()

    def on_end(self, run) -> None:
        run.records[self.name] = run.state(self).d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True, help="the testbed's index (diffmem index build)")
    ap.add_argument("--check", default="5,10,15,20,25", help="steps (of 50) to check")
    ap.add_argument("--generations", type=int, default=2)
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=64)
    a = ap.parse_args()
    steps = [int(x) for x in a.check.split(",")]
    adapter = load_adapter("testbed")
    index = TrainingIndex.load(a.index)
    rows = read_broad_labels()
    prompts = [r["prompt"] for r in rows]
    y = np.array([r["memorized"] for r in rows], dtype=int)
    jobs = [(i, a.seed + g) for i in range(len(prompts)) for g in range(a.generations)]
    dist = {k: np.zeros(len(jobs)) for k in steps}
    t0 = time.perf_counter()
    for s in range(0, len(jobs), a.batch_size):
        chunk = jobs[s : s + a.batch_size]
        res = sample(adapter, [prompts[i] for i, _ in chunk],
                     generator=seeded_generators([g for _, g in chunk]),
                     hooks=[X0Distance(index, steps)], decode=False, stop_when_done=True)
        for k in steps:
            dist[k][s : s + len(chunk)] = res.records[X0Distance.name][k]
    print(f"{(time.perf_counter() - t0) / len(prompts):.3f} s/prompt, {a.generations} generations, "
          f"seeds from {a.seed}; per group: AUC/TPR@1%FPR")
    groups = sorted({r["group"] for r in rows})
    for k in steps:
        d = dist[k].reshape(len(prompts), a.generations)
        for agg, score in (("min", -d.min(1)), ("mean", -d.mean(1))):
            parts = []
            for g in groups:
                pos = np.array([r["group"] == g for r in rows]) & (y == 1)
                yy = np.r_[np.ones(pos.sum()), np.zeros((y == 0).sum())]
                ss = np.r_[score[pos], score[y == 0]]
                parts.append(f"{g} {roc_auc_score(yy, ss):.3f}/{tpr_at_fpr(yy, ss, 0.01):.2f}")
            print(f"step {k:2d} {agg:4s}: AUC {roc_auc_score(y, score):.3f} TPR@1%FPR "
                  f"{tpr_at_fpr(y, score, 0.01):.3f} | " + " ".join(parts))


if __name__ == "__main__":
    main()

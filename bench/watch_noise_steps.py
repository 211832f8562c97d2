"""Per-step noise magnitude (Wen et al. eq. 4) of the first K steps of each image of one split of the
broad set, copying images (by the labels' own seeds) and non-copying clean / held-out images, for
choosing a watch statistic (bench/watch_noise_analyze.py). Writes ``runs/watch/nm_SPLIT.json``.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/watch_noise_steps.py dev 16
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from diffmem.core.magnitude import noise_magnitude
from diffmem.core.sampling import Hook, sample, seeded_generators
from diffmem.models.adapter import load_adapter
from diffmem.testbed import labelled_prompts, labels_of
from diffmem.testbed.broad import read_broad_labels

K = 12


class Record(Hook):
    name = "rec"

    def on_start(self, run) -> None:
        run.state(self).m = []

    def on_step(self, run, step) -> None:
        run.state(self).m.append(noise_magnitude(step.eps_cond, step.eps_uncond).cpu())
        if step.index >= K - 1:
            run.stop = True

    def on_end(self, run) -> None:
        run.records["nm"] = torch.stack(run.state(self).m, 1)


def main() -> None:
    split, per = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    adapter = load_adapter("testbed")
    rows = [r for r in read_broad_labels(labels_of(adapter)) if r["split"] == split]
    by: dict = {}
    for r in rows:
        if r["memorized"] or r["group"] == "clean":
            by.setdefault((r["group"], r["memorized"]), []).append(r)
    jobs = [(group, r["prompt"], s, bool(d < 0.15))
            for (group, _), rs in by.items() for r in rs[:per]
            for s, d in enumerate(r["distances"])]
    jobs += [("heldout", p.prompt, s, False) for p in labelled_prompts() if p.kind == "heldout"
             for s in range(4)]
    out, hook = [], Record()
    for k in range(0, len(jobs), 64):
        chunk = jobs[k : k + 64]
        res = sample(adapter, [j[1] for j in chunk], hooks=[hook], decode=False,
                     generator=seeded_generators([j[2] for j in chunk]))
        for j, nm in zip(chunk, res.records["nm"].tolist(), strict=True):
            out.append({"group": j[0], "prompt": j[1], "seed": j[2], "copy": j[3], "nm": nm})
    path = Path("runs/watch") / f"nm_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    print(f"{len(out)} images -> {path}")


if __name__ == "__main__":
    main()

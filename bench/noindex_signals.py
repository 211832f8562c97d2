"""No-index watch signals of every image of one split of the broad set: the first-step noise
magnitude (Wen et al. eq. 4) and the latent clean-image estimate x0 at a few steps, so that
bench/noindex_analyze.py can measure how well each signal separates copying images from clean ones
without the training index (cross-seed agreement of x0: a memorized prompt converges to the same
image from every x_T). Writes ``runs/noindex/sig_SPLIT.pt``.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/noindex_signals.py dev 16
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from diffmem.core.magnitude import noise_magnitude
from diffmem.core.sampling import Hook, sample, seeded_generators
from diffmem.models.adapter import load_adapter
from diffmem.testbed import labelled_prompts, labels_of
from diffmem.testbed.broad import read_broad_labels

STEPS = (1, 2, 3, 5, 8, 12, 20, 30, 49)


class Record(Hook):
    name = "rec"

    def on_start(self, run) -> None:
        run.state(self).x0 = {}

    def on_step(self, run, step) -> None:
        st = run.state(self)
        if step.index == 0:
            st.nm = noise_magnitude(step.eps_cond, step.eps_uncond).cpu()
        if step.index in STEPS:
            st.x0[step.index] = step.x0.detach().cpu().clone()

    def on_end(self, run) -> None:
        st = run.state(self)
        run.records["nm"] = st.nm
        run.records["x0"] = torch.stack([st.x0[s] for s in STEPS], 1)


def main() -> None:
    split, per = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    adapter = load_adapter("testbed")
    rows = [r for r in read_broad_labels(labels_of(adapter)) if r["split"] == split]
    by: dict = {}
    for r in rows:
        by.setdefault((r["group"], r["memorized"]), []).append(r)
    jobs = [(group, r["prompt"], s, bool(d < 0.15))
            for (group, _), rs in by.items() for r in rs[:per]
            for s, d in enumerate(r["distances"])]
    jobs += [("heldout", p.prompt, s, False) for p in labelled_prompts() if p.kind == "heldout"
             for s in range(4)]
    meta, nms, x0s = [], [], []
    hook = Record()
    for k in range(0, len(jobs), 64):
        chunk = jobs[k : k + 64]
        res = sample(adapter, [j[1] for j in chunk], hooks=[hook], decode=False,
                     generator=seeded_generators([j[2] for j in chunk]))
        meta += [{"group": j[0], "prompt": j[1], "seed": j[2], "copy": j[3]} for j in chunk]
        nms.append(res.records["nm"])
        x0s.append(res.records["x0"].half())
        print(k + len(chunk), "/", len(jobs), flush=True)
    path = Path("runs/noindex") / f"sig_{split}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": meta, "nm": torch.cat(nms), "x0": torch.cat(x0s), "steps": STEPS}, path)
    print(f"{len(meta)} images -> {path}")


if __name__ == "__main__":
    main()

"""How well the guard's agreement check (two images of one prompt from different seeds that copy
each other, ``diffmem.mitigate.self_reference.agreement``) separates copying images from the
images of non-copying prompts, on plain generations of one broad-set split (4 seeds a prompt).

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/agreement_sweep.py dev runs/agree_dev.json

Prints, per agreement threshold (tiled L2 between the two images), the share flagged among the
copying images of copying prompts (TPR) and among the images of clean controls and held-out
prompts (FPR), then the flagged non-copying images with their distance to the nearest training
image (the testbed's criterion: a copy below 0.15). Rerun with the JSON alone to print again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def generate(split: str, out: Path) -> list[dict]:
    from diffmem.core.sampling import sample, seeded_generators
    from diffmem.eval.guard import _batched, _nearest, _prompt_sets
    from diffmem.eval.mitigation import _Judge
    from diffmem.mitigate.self_reference import agreement
    from diffmem.models.adapter import load_adapter
    from diffmem.testbed import require_spec
    from diffmem.testbed.data import build_testbed

    adapter = load_adapter("testbed")
    judge = _Judge(adapter, build_testbed(require_spec(adapter, "sweep")), with_sscd=False)
    rows: list[dict] = []
    for group, items in _prompt_sets(adapter, split, None, None, None).items():
        texts = [it["prompt"] for it in items for _ in range(4)]
        seeds = [s for _ in items for s in range(4)]

        def plain(ps, ss):
            res = sample(adapter, ps, generator=seeded_generators(ss), num_inference_steps=50,
                         guidance_scale=7.5)
            return res.images, [None] * len(ps)

        base, _, _ = _batched(adapter, texts, seeds, plain, 32)
        dist, _ = _nearest(judge, base)
        found = agreement(adapter, base, texts, seeds)
        rows += [{"group": group, "prompt": texts[i], "seed": seeds[i],
                  "copying_prompt": bool(items[i // 4]["copies"]), "dist": float(dist[i]),
                  "agree": found.similarity[i]} for i in range(len(texts))]
        out.write_text(json.dumps(rows))
    return rows


def main() -> None:
    out = Path(sys.argv[-1])
    rows = json.loads(out.read_text()) if len(sys.argv) == 2 else generate(sys.argv[1], out)
    pos = [r for r in rows if r["copying_prompt"] and r["dist"] < 0.15]
    neg = [r for r in rows if not r["copying_prompt"]]
    print(f"copying images {len(pos)}, images of non-copying prompts {len(neg)}; agreement of "
          "the copying images, 50/90/95th percentile: "
          + " / ".join(f"{q:.3f}" for q in np.quantile(
              [r["agree"] for r in pos if r["agree"] is not None], [0.5, 0.9, 0.95])))
    for t in (0.06, 0.07, 0.08, 0.09, 0.10, 0.11, 0.12, 0.15):
        hit = [r["agree"] is not None and r["agree"] < t for r in pos]
        false = {g: np.mean([r["agree"] is not None and r["agree"] < t for r in neg
                             if r["group"] == g]) for g in sorted({r["group"] for r in neg})}
        # prompt-wide (GuardConfig.prompt_wide): every image of a prompt with a flagged image
        wide = {r["prompt"] for r in rows if r["agree"] is not None and r["agree"] < t}
        wide_false = {g: np.mean([r["prompt"] in wide for r in neg if r["group"] == g])
                      for g in sorted({r["group"] for r in neg})}
        print(f"threshold {t:.2f}: TPR {np.mean(hit):.3f}; FPR "
              + ", ".join(f"{g} {v:.3f}" for g, v in false.items())
              + f" | prompt-wide: TPR {np.mean([r['prompt'] in wide for r in pos]):.3f}; FPR "
              + ", ".join(f"{g} {v:.3f}" for g, v in wide_false.items()))
    flagged = sorted((r for r in neg if r["agree"] is not None and r["agree"] < 0.15),
                     key=lambda r: r["agree"])
    for r in flagged:
        print(f"  agreement {r['agree']:.3f}, nearest training image {r['dist']:.3f}: "
              f"{r['group']} {r['prompt'][:70]!r} seed {r['seed']}")


if __name__ == "__main__":
    main()

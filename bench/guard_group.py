"""The guard on one or more groups of a broad-set split, image by image (which images still copy,
what flagged them, what served them), for choosing the guard's settings on the dev split.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/guard_group.py dev sentence 30 "prompt_wide=False"
    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/guard_group.py dev sentence 30 "amg_check_every=1" runs/idx

Arguments: split, comma-separated groups, prompts per group, GuardConfig fields (Python keyword
syntax, "" for the defaults), optionally a training index (else the guard runs without one).
Prints the copying images that are still served as copies (MISS) and each copying prompt's first
image, the non-copying images it changed (CHANGED, with their plain image's distance to the nearest
training image), then per group the served copy rate and the share of non-copying images served
bit-identical, the watch that changed non-copying images, and the cost against plain generation
in the same process.
"""

from __future__ import annotations

import ast
import collections
import json
import sys

import numpy as np
import torch

from diffmem.core.sampling import sample, seeded_generators
from diffmem.eval.guard import _batched, _nearest, _prompt_sets
from diffmem.eval.mitigation import _Judge
from diffmem.mitigate.guard import Guard, GuardConfig
from diffmem.models.adapter import load_adapter
from diffmem.similarity.index import load_index
from diffmem.testbed import require_spec
from diffmem.testbed.data import build_testbed

SEEDS = 4


def _settings(text: str) -> dict:
    """``"prompt_wide=False, ladder=('ren:2', 'amg')"`` -> keyword arguments of GuardConfig."""
    call = ast.parse(f"f({text})", mode="eval").body
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}


def main() -> None:
    split, groups, n = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
    config = GuardConfig(**_settings(sys.argv[4] if len(sys.argv) > 4 else ""))
    index = load_index(sys.argv[5], what="guard_group") if len(sys.argv) > 5 else None
    adapter = load_adapter("testbed")
    sets = _prompt_sets(adapter, split, groups, n, None)
    items = [dict(it, group=k) for k, v in sets.items() for it in v]
    judge = _Judge(adapter, build_testbed(require_spec(adapter, "guard_group")), with_sscd=False)
    texts = [it["prompt"] for it in items for _ in range(SEEDS)]
    seeds = [s for _ in items for s in range(SEEDS)]
    kw = {"num_inference_steps": 50, "guidance_scale": 7.5}
    guard = Guard(adapter, config=config, index=index)

    def plain(ps, ss):
        return sample(adapter, ps, generator=seeded_generators(ss), **kw).images, [None] * len(ps)

    def guarded(ps, ss):
        out = guard.generate(ps, ss, **kw)
        return out.images, [v.to_json() for v in out.verdicts]

    base, _, t_plain = _batched(adapter, texts, seeds, plain, 32)
    served, verdicts, t_guard = _batched(adapter, texts, seeds, guarded, 32)
    d_plain, nn_plain = _nearest(judge, base)
    d_served, nn_served = _nearest(judge, served)
    copying = np.array([it["copies"] for it in items for _ in range(SEEDS)], dtype=bool)
    copied = d_served < judge.threshold
    for i, text in enumerate(texts):
        if copying[i] and (copied[i] or i % SEEDS == 0):
            v = verdicts[i]
            print(("MISS " if copied[i] else "     ") + f"{text[:60]!r} s{seeds[i]} plain "
                  f"{d_plain[i]:.3f}/{int(nn_plain[i])} served {d_served[i]:.3f}/"
                  f"{int(nn_served[i])} {v['status']} {v['watch']} {v['method']} {v['tries']}")
    same = np.array([bool(torch.equal(a, b)) for a, b in zip(served, base, strict=True)])
    for name in sets:
        m = np.array([it["group"] == name for it in items for _ in range(SEEDS)])
        pos, neg = m & copying, m & ~copying
        print(json.dumps({
            "group": name, "split": split, "copying_images": int(pos.sum()),
            "plain_copy_rate": round(float((d_plain[pos] < judge.threshold).mean()), 4)
            if pos.any() else None,
            "served_copy_rate": round(float(copied[pos].mean()), 4) if pos.any() else None,
            "bit_identical": round(float(same[neg].mean()), 4) if neg.any() else None}))
    for i in np.flatnonzero(~copying & ~same):  # non-copying images the guard changed
        print(f"CHANGED {texts[i][:60]!r} s{seeds[i]} plain {d_plain[i]:.3f}/{int(nn_plain[i])} "
              f"watch {verdicts[i]['watch']}")
    changed = collections.Counter(v["watch"] for v, c, s in zip(verdicts, copying, same,
                                                                strict=True) if not c and not s)
    print("non-copying images changed, by watch:", dict(changed))
    print(f"cost vs plain: {t_guard / t_plain:.2f}x")


if __name__ == "__main__":
    main()

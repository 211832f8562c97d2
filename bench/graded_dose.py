"""Copy rate per duplicate count of ``testbed-graded``'s designed prompts, from the reports of
``diffmem testbed verify --model testbed-graded --out FILE``, as a markdown table; with SSCD in the
report (no ``--no-sscd``) also the second criterion, SSCD cosine > 0.5 to the nearest original
training image (the model's low-pass, ``sscd_lowpass``), and how well each SSCD score separates
the tiled-L2 copies from the held-out generations (AUC).

    PYTHONPATH=src python bench/graded_dose.py runs/graded_verify8k.json
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

from diffmem.models.profile import named_model
from diffmem.testbed import labelled_prompts, testbed_spec_of


def main() -> None:
    folder = named_model("testbed-graded")
    by_prompt = {p.prompt: p for p in labelled_prompts(testbed_spec_of(folder), folder)}
    for path in sys.argv[1:]:
        report = json.loads(Path(path).read_text())
        by = collections.defaultdict(list)
        sscd = collections.defaultdict(list)  # (distance, sscd to the L2-nearest, best sscd)
        for p in report["prompts"]:
            by[by_prompt[p["prompt"]].copies].extend(p["distances"])
            if "sscd_best" in p:
                sscd[by_prompt[p["prompt"]].copies].extend(
                    zip(p["distances"], p["sscd"], p["sscd_best"], strict=True))
        print(path)
        head = "| duplicates | generations | copy rate (tiled L2 < 0.15) | median distance | closest |"
        if sscd:
            head += " copy rate (SSCD > 0.5) | median SSCD | both criteria agree |"
        print(head)
        print("|---" * head.count(" | ") + "|---|")
        for c in sorted(by):
            ds = sorted(by[c])
            rate = sum(d < 0.15 for d in ds) / len(ds)
            row = (f"| {c or 'held-out'} | {len(ds)} | {rate:.3f} | {ds[len(ds) // 2]:.3f} "
                   f"| {ds[0]:.3f} |")
            if sscd:
                best = sorted(b for _, _, b in sscd[c])
                agree = sum((d < 0.15) == (b > 0.5) for d, _, b in sscd[c]) / len(best)
                row += (f" {sum(b > 0.5 for b in best) / len(best):.3f} | "
                        f"{best[len(best) // 2]:.3f} | {agree:.3f} |")
            print(row)
        if sscd:
            from diffmem.eval.metrics import roc_auc_score

            copies = [x for c in sscd if c for x in sscd[c] if x[0] < 0.15]
            held = sscd.get(0, [])
            y = [1] * len(copies) + [0] * len(held)
            for k, name in ((1, "SSCD to the tiled-L2 nearest original"),
                            (2, "best SSCD over the training set")):
                auc = roc_auc_score(y, [x[k] for x in copies + held])
                print(f"AUC, {name}: tiled-L2 copies ({len(copies)}) vs held-out ({len(held)}): "
                      f"{auc:.3f}")


if __name__ == "__main__":
    main()

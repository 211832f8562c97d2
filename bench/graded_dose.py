"""Copy rate per duplicate count of ``testbed-graded``'s designed prompts, from the reports of
``diffmem testbed verify --model testbed-graded --out FILE``, as a markdown table.

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
        for p in report["prompts"]:
            by[by_prompt[p["prompt"]].copies].extend(p["distances"])
        print(path)
        print("| duplicates | generations | copy rate (tiled L2 < 0.15) | median distance | closest |")
        print("|---|---|---|---|---|")
        for c in sorted(by):
            ds = sorted(by[c])
            rate = sum(d < 0.15 for d in ds) / len(ds)
            print(f"| {c or 'held-out'} | {len(ds)} | {rate:.3f} | {ds[len(ds) // 2]:.3f} "
                  f"| {ds[0]:.3f} |")


if __name__ == "__main__":
    main()

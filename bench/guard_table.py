"""Print the markdown table of a `diffmem eval guard` report (docs/mitigation.md).

    python bench/guard_table.py runs/guard/test_index_full.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _f(v) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def main() -> None:
    for path in sys.argv[1:]:
        rows = json.loads(Path(path).read_text())["rows"]
        print("| group | setting | images | plain copy rate | served copy rate | unresolved | "
              "regenerated | bit-identical (non-copying) | alignment vs plain | time vs plain |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['group']} | {r['setting']} | {r['n_images']} | "
                  f"{_f(r['plain_copy_rate'])} | {_f(r['served_copy_rate'])} | "
                  f"{_f(r['unresolved'])} | {_f(r['mitigated'])} | {_f(r['bit_identical'])} | "
                  f"{_f(r.get('alignment_ratio'))} | {r['cost']:.2f} |")


if __name__ == "__main__":
    main()

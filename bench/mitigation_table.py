"""Print the markdown table of a `diffmem eval mitigation` report (docs/mitigation.md).

Run: ``python bench/mitigation_table.py runs/mit/m2.json``.
"""

from __future__ import annotations

import json
import sys


def fmt(v, nd=3):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def main(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        r = json.load(f)
    print(f"seeds {r['seeds']}, steps {r['steps']}, groups {r['groups']}, criterion: {r['criterion']}")
    print()
    print("| method | mem. rate (memorized) | mem. rate (mixed) | SSCD>0.5 (memorized) | "
          "alignment (mixed) | alignment (held-out) | FPD (held-out) | held-out changed | "
          "time vs plain (memorized / held-out) |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows: dict = {}
    for x in r["rows"]:
        rows.setdefault(x["method"], {})[x["group"]] = x
    for m, g in rows.items():
        mem, mix, held = g.get("memorized", {}), g.get("mixed", {}), g.get("heldout", {})
        err = next((x["error"] for x in g.values() if "error" in x), None)
        if err and not mem.get("memorization_rate") and "memorization_rate" not in mem:
            print(f"| {m} | error: {err} | | | | | | | |")
            continue
        print(f"| {m} | {fmt(mem.get('memorization_rate'))} | {fmt(mix.get('memorization_rate'))} | "
              f"{fmt(mem.get('sscd_rate'))} | {fmt(mix.get('alignment'))} | "
              f"{fmt(held.get('alignment'))} | {fmt(held.get('fpd'), 1)} | "
              f"{fmt(held.get('changed_share'))} | {fmt(mem.get('time_ratio'), 2)} / "
              f"{fmt(held.get('time_ratio'), 2)} |")


if __name__ == "__main__":
    main(sys.argv[1])

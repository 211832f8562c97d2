"""Print the markdown table of a `diffmem eval mitigation` report (docs/mitigation.md).

Run: ``python bench/mitigation_table.py runs/mit4/m.json``.

Columns: memorization rate (testbed criterion) of memorized and mixed prompts; SSCD > 0.5 share and
SSCD mean / 95th percentile to the nearest training image (memorized prompts); tiled-L2 mean / 5th
percentile (the closest images); alignment on mixed prompts and its ratio to plain; held-out
alignment and FPD (and FPD's ratio to plain); the share of held-out images that changed; the share
of images a method left unmitigated (reanchor without a clearing edit); time against plain.
"""

from __future__ import annotations

import json
import sys


def fmt(v, nd=3):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def ratio(a, b):
    return None if a is None or not b else a / b


def main(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        r = json.load(f)
    print(f"seeds {r['seeds']}, steps {r['steps']}, groups {r['groups']}, "
          f"criterion: {r['criterion']}")
    print()
    print("| method | mem. rate (memorized) | mem. rate (mixed) | SSCD>0.5 (memorized) | "
          "SSCD mean / p95 (memorized) | tiled L2 mean / p5 (memorized) | alignment (mixed) | "
          "vs plain | alignment (held-out) | FPD (held-out) | vs plain | held-out changed | "
          "left unmitigated (memorized) | time vs plain (memorized / held-out) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows: dict = {}
    for x in r["rows"]:
        rows.setdefault(x["method"], {})[x["group"]] = x
    plain = rows.get("plain", {})
    p_mix = plain.get("mixed", {}).get("alignment")
    p_fpd = plain.get("heldout", {}).get("fpd")
    for m, g in rows.items():
        mem, mix, held = g.get("memorized", {}), g.get("mixed", {}), g.get("heldout", {})
        err = next((x["error"] for x in g.values() if "error" in x), None)
        if err and "memorization_rate" not in mem:
            print(f"| {m} | error: {err} |" + " |" * 12)
            continue
        print(f"| {m} | {fmt(mem.get('memorization_rate'))} | "
              f"{fmt(mix.get('memorization_rate'))} | {fmt(mem.get('sscd_rate'))} | "
              f"{fmt(mem.get('sscd_mean'))} / {fmt(mem.get('sscd_p95'))} | "
              f"{fmt(mem.get('distance_mean'))} / {fmt(mem.get('distance_p5'))} | "
              f"{fmt(mix.get('alignment'))} | {fmt(ratio(mix.get('alignment'), p_mix), 2)} | "
              f"{fmt(held.get('alignment'))} | {fmt(held.get('fpd'), 1)} | "
              f"{fmt(ratio(held.get('fpd'), p_fpd), 2)} | {fmt(held.get('changed_share'))} | "
              f"{fmt(mem.get('unmitigated_share'))} | {fmt(mem.get('time_ratio'), 2)} / "
              f"{fmt(held.get('time_ratio'), 2)} |")


if __name__ == "__main__":
    main(sys.argv[1])

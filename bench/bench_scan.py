"""Scan benchmark (issue 16): prompts/s of ``diffmem scan`` on the local engine and on Ray with 1 and
2 workers, in one run, and Ray's overhead against local at 1 worker.

Every configuration scans the same ``--prompts`` testbed prompts (the labelled testbed prompts,
repeated and numbered) with the default detector (first-step noise magnitude) into a fresh folder,
one CPU thread per worker. Two figures per configuration:

- end to end: prompts / wall time of the whole ``scan()`` call (Ray: starting a local Ray
  instance, actor start and model load included; local: model load included);
- steady state: prompts of shards 2..n / time between the first and the last shard file being
  written (the shard files' modification times), i.e. the throughput once the workers run, which
  is what more prompts or more workers scale.

Each configuration runs ``--rounds`` times, the order alternating between rounds (local, ray-1,
ray-2, then ray-2, ray-1, local), since a shared machine's load drifts; every run is printed and the
comparison uses each configuration's best round.

Run: ``OMP_NUM_THREADS=1 python bench/bench_scan.py [--prompts 2048] [--shard-size 256]
[--rounds 2]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from diffmem.scale.scan import ScanConfig, scan


def write_prompts(path: Path, n: int) -> Path:
    from diffmem.testbed import shipped_testbed_spec
    from diffmem.testbed.data import build_testbed

    pool = [p.prompt for p in build_testbed(shipped_testbed_spec()).prompts]
    path.write_text("".join(f"{pool[i % len(pool)]}\n" for i in range(n)), encoding="utf-8")
    return path


def shard_gaps(out: Path) -> list[float]:
    """Seconds between consecutive shard files being written (modification times)."""
    t = sorted(p.stat().st_mtime_ns / 1e9 for p in out.glob("shard-*.parquet"))
    return [b - a for a, b in itertools.pairwise(t)]


def run(name: str, prompts: Path, root: Path, shard_size: int, rnd: int, **kw) -> dict:
    out = root / f"{name}-{rnd}"
    t0 = time.perf_counter()
    s = scan(prompts, out, ScanConfig(model="testbed", shard_size=shard_size, threshold=1e9,
                                      threads=1, **kw))
    wall = time.perf_counter() - t0
    first = min(p.stat().st_mtime_ns for p in out.glob("shard-*.parquet")) / 1e9
    gaps = shard_gaps(out)
    span = sum(gaps)
    return {"config": name, "round": rnd, "prompts": s["n_prompts"], "wall_s": round(wall, 2),
            "end_to_end_prompts_per_s": round(s["n_prompts"] / wall, 2),
            # shards 2..n over the time from the first shard file to the last
            "steady_prompts_per_s": round((s["n_prompts"] - shard_size) / span, 2),
            "median_shard_s": round(statistics.median(gaps), 3),
            "to_first_shard_s": round(first - (out / "manifest.json").stat().st_mtime_ns / 1e9, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=2048)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds of the three configurations, alternating their order")
    ap.add_argument("--out", default=None, help="keep the scan folders here (default: temp)")
    a = ap.parse_args()
    configs = [("local", {}), ("ray-1", {"engine": "ray", "workers": 1}),
               ("ray-2", {"engine": "ray", "workers": 2})]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        prompts = write_prompts(root / "prompts.txt", a.prompts)
        for rnd in range(a.rounds):
            for name, kw in (configs if rnd % 2 == 0 else configs[::-1]):
                rows.append(run(name, prompts, root, a.shard_size, rnd, **kw))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{a.prompts} testbed prompts, shard size {a.shard_size}, 1 thread per worker, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, {os.cpu_count()} CPUs, "
          f"{a.rounds} rounds; load average at the end {os.getloadavg()[0]:.2f}")
    print("| config | wall s | end-to-end prompts/s | steady prompts/s | median shard s | "
          "to first shard s |")
    print("|---|---|---|---|---|---|")
    best = {}
    for name, _ in configs:
        mine = [r for r in rows if r["config"] == name]
        b = max(mine, key=lambda r: r["steady_prompts_per_s"])
        best[name] = b
        for r in mine:
            print(f"| {name} (round {r['round']}) | {r['wall_s']} | {r['end_to_end_prompts_per_s']} "
                  f"| {r['steady_prompts_per_s']} | {r['median_shard_s']} | "
                  f"{r['to_first_shard_s']} |")
    lo, r1, r2 = best["local"], best["ray-1"], best["ray-2"]
    print(f"\nbest round of each: Ray overhead at 1 worker, steady state "
          f"{100 * (lo['steady_prompts_per_s'] / r1['steady_prompts_per_s'] - 1):+.1f}% time per "
          f"prompt vs local; end to end {100 * (r1['wall_s'] / lo['wall_s'] - 1):+.1f}% wall time; "
          f"Ray 2 workers vs 1 steady state "
          f"{r2['steady_prompts_per_s'] / r1['steady_prompts_per_s']:.2f}x")


if __name__ == "__main__":
    main()

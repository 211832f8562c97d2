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

Run: ``OMP_NUM_THREADS=1 python bench/bench_scan.py [--prompts 4096] [--shard-size 256]``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from diffmem.scale.scan import scan


def write_prompts(path: Path, n: int) -> Path:
    from diffmem.testbed import shipped_testbed_spec
    from diffmem.testbed.data import build_testbed

    pool = [p.prompt for p in build_testbed(shipped_testbed_spec()).prompts]
    path.write_text("".join(f"{pool[i % len(pool)]}\n" for i in range(n)), encoding="utf-8")
    return path


def steady_rate(out: Path, shard_size: int) -> tuple[float, float]:
    """(prompts/s between the first and the last shard written, seconds to the first shard)."""
    times = sorted(p.stat().st_mtime_ns / 1e9 for p in out.glob("shard-*.parquet"))
    manifest = (out / "manifest.json").stat().st_mtime_ns / 1e9
    total = json.loads((out / "summary.json").read_text())["n_prompts"]
    first_count = min(shard_size, total)
    span = times[-1] - times[0]
    return (total - first_count) / span if span > 0 else float("nan"), times[0] - manifest


def run(name: str, prompts: Path, root: Path, shard_size: int, **kw) -> dict:
    out = root / name
    t0 = time.perf_counter()
    s = scan(prompts, out, model="testbed", shard_size=shard_size, threshold=1e9, threads=1,
             **kw)
    wall = time.perf_counter() - t0
    steady, first = steady_rate(out, shard_size)
    return {"config": name, "prompts": s["n_prompts"], "wall_s": round(wall, 2),
            "end_to_end_prompts_per_s": round(s["n_prompts"] / wall, 2),
            "steady_prompts_per_s": round(steady, 2), "to_first_shard_s": round(first, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4096)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--out", default=None, help="keep the scan folders here (default: temp)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        prompts = write_prompts(root / "prompts.txt", a.prompts)
        rows = [run("local", prompts, root, a.shard_size),
                run("ray-1", prompts, root, a.shard_size, engine="ray", workers=1),
                run("ray-2", prompts, root, a.shard_size, engine="ray", workers=2)]
    print(f"\n{a.prompts} testbed prompts, shard size {a.shard_size}, 1 thread per worker, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, {os.cpu_count()} CPUs, "
          f"load average at the end {os.getloadavg()[0]:.2f}")
    print("| config | wall s | end-to-end prompts/s | steady prompts/s | to first shard s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['wall_s']} | {r['end_to_end_prompts_per_s']} | "
              f"{r['steady_prompts_per_s']} | {r['to_first_shard_s']} |")
    local, ray1 = rows[0], rows[1]
    print(f"\nRay overhead at 1 worker, steady state: "
          f"{100 * (local['steady_prompts_per_s'] / ray1['steady_prompts_per_s'] - 1):.1f}% "
          f"(time per prompt, Ray vs local); end to end: "
          f"{100 * (ray1['wall_s'] / local['wall_s'] - 1):.1f}% (wall time)")
    print(f"Ray 2 workers vs 1, steady state: "
          f"{rows[2]['steady_prompts_per_s'] / ray1['steady_prompts_per_s']:.2f}x")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

"""Latency of the page's live check (issue 27): the first-step estimate and the verdict by
generation, from the last keystroke, for one user.

``diffmem serve --model testbed --index IDX`` runs as a separate process on 127.0.0.1. One
client does what the page does for each prompt it "types": after the last keystroke it waits
the page's debounce (150 ms), sends ``POST /v1/detect {"verdict": "estimate"}`` (the estimate is
shown when it answers), then ``POST /v1/detect {"verdict": "generation", "evidence": true}``
(4 previews of 20 steps searched in the index, through the preview micro-batcher; the verdict and
its two images are shown when it answers). Latencies are measured from the last keystroke, so
they include the debounce. Every prompt is new to the server (its verdict cache does not help).
Prompts: the broad set's test split, copying and not, in file order (``--prompts`` of them).

Run: ``OMP_NUM_THREADS=2 python bench/bench_live_check.py --index IDX [--prompts 40] [--out F]``
(the server inherits the environment: 2 threads = the 2 cores the figures are for).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

import numpy as np

DEBOUNCE_S = 0.15  # the page's DEBOUNCE_MS


from bench_service import free_port, wait_ready  # noqa: E402  (bench/ is the script's folder)


async def one_user(url: str, prompts: list[str]) -> dict:
    import httpx

    est, ver, copies = [], [], []
    async with httpx.AsyncClient(timeout=60) as c:
        # warm-up (first UNet calls, index check): not counted
        await c.post(url + "/v1/detect", json={"prompts": ["warm up"], "verdict": "generation"})
        for p in prompts:
            t0 = time.perf_counter()  # the last keystroke
            await asyncio.sleep(DEBOUNCE_S)
            r = await c.post(url + "/v1/detect", json={"prompts": [p], "verdict": "estimate"})
            r.raise_for_status()
            est.append(time.perf_counter() - t0)
            r = await c.post(url + "/v1/detect", json={"prompts": [p], "verdict": "generation",
                                                       "evidence": True})
            r.raise_for_status()
            ver.append(time.perf_counter() - t0)
            copies.append(r.json()["results"][0]["verdict"]["copies"])

    def pct(a):
        a = np.asarray(a)
        return {"p50": round(float(np.percentile(a, 50)), 3),
                "p95": round(float(np.percentile(a, 95)), 3),
                "max": round(float(a.max()), 3)}

    return {"estimate_s": pct(est), "verdict_s": pct(ver), "n": len(prompts),
            "copying_by_verdict": int(sum(copies))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True, help="training index (diffmem index build testbed)")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from diffmem.testbed.broad import read_broad_labels

    rows = [r for r in read_broad_labels(None) if r.get("split") == "test"][: a.prompts]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "diffmem.cli", "serve", "--model", "testbed", "--index",
           a.index, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=os.environ.copy(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        asyncio.run(wait_ready(url, proc))
        out = asyncio.run(one_user(url, [r["prompt"] for r in rows]))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out.update({"debounce_s": DEBOUNCE_S, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                "cpus": os.cpu_count()})
    print(json.dumps(out, indent=2))
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

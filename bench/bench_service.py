"""Load benchmark of the guard service (issues 15, 24): ``diffmem serve`` on loopback under concurrent
clients (64 by default) vs the library's batched detection in the same run.

1. The library figure: ``NoiseMagnitude(steps=1).score(adapter, prompts)`` on the testbed, 64
   prompts per call (batches of 16, the service's ``--max-batch``), repeated for ``--lib-seconds``,
   measured before and after the load phase (prompts/s; the mean of the two is the reference).
2. The service: ``python -m diffmem.cli serve --model testbed --threshold T`` started as a separate
   process on 127.0.0.1 (same OMP/torch thread settings), then ``--clients`` asyncio clients each
   send ``POST /v1/detect`` with 1-8 prompts (seeded) back to back for ``--seconds``, and with
   probability ``--mix`` an explain or a 10-step generate instead. A 503 must carry Retry-After
   (the client then waits that long, at most 5 s); any other 5xx, a transport error or a timeout
   counts as a failure. Throughput = prompts answered / wall time of the phase; latency
   percentiles over admitted (200) requests, which must stay below the server's timeout.
3. The audit: the server writes ``--audit-db``; after it stops, the rows must be exactly one per
   prompt of every 200 answer plus one per rejected ``/v1`` request (no row lost).

Loopback only, bounded in time (each request has a 60 s client timeout; the phase ends at
``--seconds``; the server is stopped at the end). The threshold is the calibrated default
(``diffmem.mitigate.default_threshold``), computed here once and passed to the server.

Run: ``OMP_NUM_THREADS=1 python bench/bench_service.py [--seconds 30] [--clients 64] [--out F]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from diffmem.testbed import spec_of


def library_throughput(adapter, prompts: list[str], seconds: float) -> float:
    from diffmem.detect import NoiseMagnitude

    det = NoiseMagnitude(steps=1, batch_size=16)
    det.score(adapter, prompts[:16])  # warm-up
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        det.score(adapter, prompts)
        n += len(prompts)
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    t0 = time.monotonic()
    async with httpx.AsyncClient() as c:
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if (await c.get(url + "/healthz", timeout=2)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("server did not start in time")


async def load_phase(url: str, pool: list[str], clients: int, seconds: float, seed: int,
                     pid: int, mix: float = 0.0, timeout_s: float = 60.0) -> dict:
    import httpx

    latencies: dict[str, list[float]] = {}
    statuses: dict[str, int] = {}
    sent = answered = prompts_answered = lost = wrong = bad_5xx = rejected = scored_rows = 0
    deadline = time.monotonic() + seconds

    async def client(k: int, c: httpx.AsyncClient) -> None:
        nonlocal sent, answered, prompts_answered, lost, wrong, bad_5xx, rejected, scored_rows
        rng = random.Random(seed + k)
        while time.monotonic() < deadline:
            roll = rng.random()
            if roll < mix / 2:
                path, body, n = "/v1/explain", {"prompt": rng.choice(pool)}, 1
            elif roll < mix:
                path, n = "/v1/generate", 1
                body = {"prompt": rng.choice(pool), "mitigate": "none", "steps": 10,
                        "compare": False, "seed": rng.randint(0, 9)}
            else:
                batch = rng.sample(pool, rng.randint(1, 8))
                path, body, n = "/v1/detect", {"prompts": batch}, len(batch)
            sent += 1
            t0 = time.perf_counter()
            try:
                r = await c.post(url + path, json=body, timeout=timeout_s + 10)
            except httpx.HTTPError:
                lost += 1
                continue
            took = time.perf_counter() - t0
            key = f"{path} {r.status_code}"
            statuses[key] = statuses.get(key, 0) + 1
            answered += 1
            if r.status_code == 200:
                latencies.setdefault(path, []).append(took)
                scored_rows += n
                if path == "/v1/detect":
                    res = r.json()["results"]
                    if [x["prompt"] for x in res] != body["prompts"]:
                        wrong += 1
                    prompts_answered += len(res)
                continue
            rejected += 1
            if r.status_code >= 500 and not (r.status_code == 503 and "retry-after" in r.headers):
                bad_5xx += 1
            if r.status_code == 503:
                await asyncio.sleep(min(5.0, float(r.headers.get("retry-after", 1))))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits) as c:
        before = _server_counts((await c.get(url + "/metrics")).text)
        t0, c0 = time.perf_counter(), cpu_seconds(pid)
        await asyncio.gather(*(client(k, c) for k in range(clients)))
        wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - c0
        after = _server_counts((await c.get(url + "/metrics")).text)
    server = {k: after[k] - before[k] for k in after}
    server["mean_batch"] = server["prompts"] / server["batches"] if server["batches"] else 0.0
    every = np.array([x for v in latencies.values() for x in v]) * 1000

    def pct(a: np.ndarray) -> dict:
        if not a.size:
            return {}
        return {"n": int(a.size), "p50": float(np.percentile(a, 50)),
                "p95": float(np.percentile(a, 95)), "p99": float(np.percentile(a, 99)),
                "max": float(a.max())}

    return {"requests_sent": sent, "requests_answered": answered, "lost": lost,
            "wrong_results": wrong, "statuses": statuses, "rejected": rejected,
            "server_5xx_other_than_503_retry_after": bad_5xx,
            "prompts_answered": prompts_answered, "wall_s": wall, "expected_audit": {
                "scored_rows": scored_rows, "rejected_rows": rejected},
            "throughput_prompts_s": prompts_answered / wall, "server_cpu_s": cpu,
            "prompts_per_server_cpu_s": prompts_answered / cpu,
            "latency_ms": pct(every),
            "latency_ms_by_endpoint": {k: pct(np.array(v) * 1000) for k, v in latencies.items()},
            "server_metrics": server}


def _server_counts(text: str) -> dict:
    def value(pattern: str) -> float:
        m = re.search(pattern + r" ([0-9.e+]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    return {"detect_200": value(r'^diffmem_requests_total\{endpoint="/v1/detect",status="200"\}'),
            "batches": value(r"^diffmem_batch_prompts_count"),
            "prompts": value(r"^diffmem_batch_prompts_sum")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="load phase length")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--mix", type=float, default=0.1,
                    help="share of requests that are explain / generate (half each)")
    ap.add_argument("--timeout", type=float, default=60.0, help="the server's --timeout")
    ap.add_argument("--lib-seconds", type=float, default=10.0, help="each library measurement")
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench_service.json")
    a = ap.parse_args(argv)

    from diffmem.mitigate import default_threshold
    from diffmem.models.adapter import load_adapter
    from diffmem.testbed.data import build_testbed

    adapter = load_adapter("testbed")
    threshold = default_threshold(adapter)
    pool = [p.prompt for p in build_testbed(spec_of(adapter)).prompts]
    lib_prompts = (pool * 2)[:64]
    lib_before, lib_cpu_before = library_throughput(adapter, lib_prompts, a.lib_seconds)
    print(f"library batched detect: {lib_before:.1f} prompts/s (before)", flush=True)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    import tempfile

    audit_db = Path(tempfile.mkdtemp(prefix="bench_service_")) / "audit.sqlite"
    cmd = [sys.executable, "-m", "diffmem.cli", "serve", "--model", "testbed", "--host",
           "127.0.0.1", "--port", str(port), "--threshold", repr(threshold),
           "--batch-wait-ms", str(a.batch_wait_ms), "--log-level", "warning",
           "--timeout", str(a.timeout), "--max-steps", "10", "--audit-db", str(audit_db)]
    proc = subprocess.Popen(cmd, env=os.environ.copy(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        asyncio.run(wait_ready(url, proc))
        warm = asyncio.run(load_phase(url, pool, a.clients, min(5.0, a.seconds), a.seed + 1000,
                                      proc.pid, a.mix, a.timeout))  # warm-up
        load = asyncio.run(load_phase(url, pool, a.clients, a.seconds, a.seed, proc.pid, a.mix,
                                      a.timeout))
    finally:
        proc.terminate()  # SIGTERM: graceful shutdown, exit 0
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = None
    import sqlite3

    with sqlite3.connect(audit_db) as db:
        scored = db.execute("SELECT COUNT(*) FROM audit WHERE decision != 'rejected'").fetchone()[0]
        rejected = db.execute("SELECT COUNT(*) FROM audit WHERE decision = 'rejected'").fetchone()[0]
    expect = {k: warm["expected_audit"][k] + load["expected_audit"][k]
              for k in ("scored_rows", "rejected_rows")}
    audit = {"scored_rows": scored, "rejected_rows": rejected, "expected": expect,
             "lost_rows": expect["scored_rows"] - scored + expect["rejected_rows"] - rejected,
             "server_exit_code": rc}
    lib_after, lib_cpu_after = library_throughput(adapter, lib_prompts, a.lib_seconds)
    print(f"library batched detect: {lib_after:.1f} prompts/s (after)", flush=True)
    lib = (lib_before + lib_after) / 2
    lib_cpu = (lib_cpu_before + lib_cpu_after) / 2
    report = {"command": " ".join(["python", "bench/bench_service.py", *(argv or sys.argv[1:])]),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count(),
              "threshold": threshold, "clients": a.clients, "seconds": a.seconds,
              "library_prompts_s": {"before": lib_before, "after": lib_after, "mean": lib},
              "library_prompts_per_cpu_s": {"before": lib_cpu_before, "after": lib_cpu_after,
                                            "mean": lib_cpu},
              "timeout_s": a.timeout, "mix": a.mix, "audit": audit,
              "service": load, "ratio_service_over_library": load["throughput_prompts_s"] / lib,
              "ratio_per_cpu_s": load["prompts_per_server_cpu_s"] / lib_cpu}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    s = load
    print(f"service: {s['throughput_prompts_s']:.1f} prompts/s over {s['wall_s']:.1f} s, "
          f"{s['requests_answered']}/{s['requests_sent']} requests answered, lost {s['lost']}, "
          f"5xx other than 503+Retry-After {s['server_5xx_other_than_503_retry_after']}, "
          f"statuses {s['statuses']}")
    print(f"admitted latency ms: p50 {s['latency_ms']['p50']:.0f}  p95 {s['latency_ms']['p95']:.0f}"
          f"  p99 {s['latency_ms']['p99']:.0f}  max {s['latency_ms']['max']:.0f}; by endpoint "
          f"{s['latency_ms_by_endpoint']}; server: {s['server_metrics']}")
    print(f"audit: {audit}")
    print(f"per CPU-second: service {s['prompts_per_server_cpu_s']:.1f}, library {lib_cpu:.1f} "
          f"prompts (ratio {report['ratio_per_cpu_s']:.3f})")
    print(f"ratio service / library = {report['ratio_service_over_library']:.3f}; wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

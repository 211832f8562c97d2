"""Start-up benchmark (issue 14, item 9): ``diffmem detect`` on the testbed's 92 labelled prompts,
end to end as a user runs it (a fresh process: imports, model load, scoring, writing the CSV).

Reports, per run, the wall time and the CPU time (user + system) of the child process, and, from one
instrumented in-process run, where the CPU time goes: importing torch/diffusers/transformers and
diffmem, loading the pipeline, scoring. On a loaded machine wall time exceeds CPU time by the
waiting for a core; both are printed with the load average. Also times listing the labelled prompts
(what ``eval detection`` and ``testbed prompts`` need) from the stored ``prompts.json`` against
rebuilding the 4,020-item testbed.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=src python bench/bench_startup.py [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

PHASES = r"""
import time
t0 = time.perf_counter(); c0 = time.process_time()
import torch, diffusers, transformers  # noqa
from diffusers import StableDiffusionPipeline  # noqa
t1 = time.perf_counter(); c1 = time.process_time()
import diffmem.cli  # noqa
from diffmem.detect import NoiseMagnitude
from diffmem.detect.prompts import read_prompts
from diffmem.models.adapter import load_adapter
t2 = time.perf_counter(); c2 = time.process_time()
ad = load_adapter("testbed")
t3 = time.perf_counter(); c3 = time.process_time()
scores = NoiseMagnitude().score(ad, read_prompts(PROMPTS))
t4 = time.perf_counter(); c4 = time.process_time()
for name, w, c in (("import torch + diffusers + transformers", t1 - t0, c1 - c0),
                   ("import diffmem (cli, detect, adapter)", t2 - t1, c2 - c1),
                   ("load the testbed pipeline", t3 - t2, c3 - c2),
                   ("score 92 prompts (first step, 1 generation)", t4 - t3, c4 - c3)):
    print(f"{name:45s} wall {w:6.2f} s  CPU {c:6.2f} s")
"""

FLOORS = (
    ("bare python (-c pass)", "pass"),
    ("import torch", "import torch"),
    ("import torch + UNet2DConditionModel + CLIPTextModel + CLIPTokenizer",
     "import torch; from diffusers import UNet2DConditionModel, DDIMScheduler; "
     "from transformers import CLIPTextModel, CLIPTokenizer"),
)


def _child(cmd: list[str], env: dict) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", "1"), "DIFFMEM_PROGRESS": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "testbed_prompts.jsonl"
        subprocess.run([sys.executable, "-m", "diffmem.cli", "testbed", "prompts", "--out",
                        str(prompts)], env=env, check=True, stdout=subprocess.DEVNULL)
        n = sum(1 for _ in prompts.open())
        print(f"load average before: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})")
        # the default detector (sharpness, 4 generations) and the one-step option
        for extra in ([], ["--detector", "noise_magnitude"]):
            cmd = [sys.executable, "-m", "diffmem.cli", "detect", str(prompts), "--out",
                   str(Path(tmp) / "scores.csv"), *extra]
            print(f"command: diffmem detect testbed_prompts.jsonl ({n} prompts) --out scores.csv "
                  + " ".join(extra))
            runs = [_child(cmd, env) for _ in range(args.repeats)]
            for i, (wall, cpu) in enumerate(runs, 1):
                print(f"  run {i}: wall {wall:6.2f} s  CPU (user+sys) {cpu:6.2f} s")
            print(f"  best: wall {min(w for w, _ in runs):.2f} s, "
                  f"CPU {min(c for _, c in runs):.2f} s")
        # the floor under any detect on stock libraries: a fresh process that only imports what
        # scoring needs (no pipeline class, no diffmem), and a bare interpreter
        for label, code in FLOORS:
            floor = [_child([sys.executable, "-c", code], env) for _ in range(args.repeats)]
            print(f"floor, {label}: best wall {min(w for w, _ in floor):.2f} s, "
                  f"CPU {min(c for _, c in floor):.2f} s")
        help_runs = [_bad_option(env) for _ in range(args.repeats)]
        print(f"bad option answered (generate --guidance-scale nan): best wall "
              f"{min(w for w, _ in help_runs):.2f} s, CPU {min(c for _, c in help_runs):.2f} s")
        print("where the CPU time goes (one in-process run):")
        subprocess.run([sys.executable, "-c", f"PROMPTS = {str(prompts)!r}\n" + PHASES],
                       env=env, check=True, stderr=subprocess.DEVNULL)
        listing = ("import time; from diffmem.testbed import labelled_prompts, shipped_testbed_spec;"
                   "from diffmem.testbed.data import build_testbed; s = shipped_testbed_spec();"
                   "t = time.process_time(); p = labelled_prompts(s); a = time.process_time() - t;"
                   "t = time.process_time(); q = build_testbed(s).prompts;"
                   "b = time.process_time() - t; assert p == q;"
                   "print(f'listing {len(p)} labelled prompts: stored prompts.json {a:.3f} s CPU, "
                   "rebuilding the testbed {b:.3f} s CPU (identical lists)')")
        subprocess.run([sys.executable, "-c", listing], env=env, check=True)
        print(f"load average after: {os.getloadavg()[0]:.2f}")


def _bad_option(env: dict) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "diffmem.cli", "generate", "x",
                           "--guidance-scale", "nan"], env=env, capture_output=True)
    assert proc.returncode == 2
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


if __name__ == "__main__":
    main()

"""What the training-time mitigations cost: seconds per training step against the plain fine-tune,
measured in one run.

Every method of the planted-duplicates benchmark (:data:`diffmem.train.bench.METHODS`) fine-tunes
the shipped testbed for ``--steps`` steps with the benchmark's batch and settings
(:data:`diffmem.train.bench.TRAIN`) on the planted set; methods run interleaved in ``--repeats``
rounds and the minimum loop time is kept, so that load drifts hit all alike. The ratio to plain is
the loop-time ratio; de-duplication also costs its one-off index build (printed beside it, and
added for the full budget of the benchmark: ``(steps_full * t_step + t_dedup) / (steps_full *
t_plain)``).

Run: ``OMP_NUM_THREADS=2 PYTHONPATH=src python bench/bench_training.py --data runs/tbench/data``
(the folder ``diffmem eval training --out runs/tbench`` builds; built here when missing).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch


def main() -> None:
    from diffmem.train.bench import METHODS, TRAIN, build_planted_set, method_config
    from diffmem.train.trainer import finetune

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="planted set folder (built when missing)")
    ap.add_argument("--calibration", default=None,
                    help="calibration.json of the benchmark (default: DATA/../calibration.json)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per method and round")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_training_"))
    data = Path(a.data) if a.data else tmp / "data"
    build_planted_set(data)
    cal_file = Path(a.calibration) if a.calibration else data.parent / "calibration.json"
    calibration = json.loads(cal_file.read_text()) if cal_file.is_file() else None
    methods = a.methods.split(",")
    if "plain" not in methods:
        methods.insert(0, "plain")
    loop: dict[str, list[float]] = {m: [] for m in methods}
    dedup: dict[str, float] = {}
    try:
        for r in range(a.repeats):
            for m in methods:
                out = tmp / f"{m}-{r}"
                cfg = method_config(m, steps=a.steps, calibration=calibration)
                finetune("testbed", data / "data.jsonl", out, cfg, progress=False)
                log = json.loads((out / "train_log.json").read_text())
                loop[m].append(log["seconds_training"])
                dedup[m] = log.get("seconds_dedup_this_run", 0.0)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    full = TRAIN["steps"]
    base = min(loop["plain"]) / a.steps
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch "
          f"{TRAIN['batch_size']}, {a.steps} timed steps per method, min of {a.repeats} rounds")
    print(f"{'method':<16} {'s/step':>8} {'x plain':>8} {'dedup s':>8} "
          f"{'x plain over ' + str(full) + ' steps':>24}")
    for m in methods:
        step = min(loop[m]) / a.steps
        total = (full * step + dedup[m]) / (full * base)
        print(f"{m:<16} {step:8.3f} {step / base:8.3f} {dedup[m]:8.2f} {total:24.3f}")


if __name__ == "__main__":
    main()

"""What ``preview_replication`` costs (issue 12): scoring prompts with short previews searched in
the training set's index, against the index-free default detector and against what the previews
replace, plain generation.

For ``--prompts`` prompts of the testbed's broad set, timed in one run (minimum of ``--repeats``
interleaved rounds after a warm-up):

- ``preview``: ``PreviewReplication(index).score`` -- 4 previews of 20 DDIM steps per prompt,
  decoded and searched in the index (the default detector with ``--index``);
- ``sharpness``: the index-free default, ``Sharpness().score`` (1 step, 4 generations, JVP);
- ``generate``: the plain diffusers pipeline, 4 images of 50 steps per prompt (what a user who
  checks by generating pays; decoding included, no index search).

Prints seconds per prompt and the ratios preview / generate and preview / sharpness.

    diffmem index build testbed --out runs/idx
    OMP_NUM_THREADS=2 PYTHONPATH=src python bench/bench_preview.py --index runs/idx
"""

from __future__ import annotations

import argparse
import time

import torch

from diffmem.core.sampling import seeded_generators
from diffmem.detect import Sharpness
from diffmem.detect.replication import PreviewReplication
from diffmem.models.adapter import load_adapter
from diffmem.similarity.index import TrainingIndex
from diffmem.testbed.broad import read_broad_labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--index", required=True, help="the testbed's index (diffmem index build)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    a = ap.parse_args()

    adapter = load_adapter("testbed")
    index = TrainingIndex.load(a.index)
    prompts = [r["prompt"] for r in read_broad_labels()][: a.prompts]
    preview = PreviewReplication(index, batch_size=a.batch_size)
    sharp = Sharpness(batch_size=a.batch_size)
    pipe = adapter.pipe

    def generate() -> None:
        per = max(1, a.batch_size // 4)
        for k in range(0, len(prompts), per):
            chunk = prompts[k : k + per]
            with torch.no_grad():
                pipe(chunk, num_images_per_prompt=4, num_inference_steps=50,
                     generator=seeded_generators(range(4 * len(chunk))), output_type="pt")

    runs = {"preview": lambda: preview.score(adapter, prompts),
            "sharpness": lambda: sharp.score(adapter, prompts), "generate": generate}
    for fn in runs.values():  # warm-up
        fn()
    best = {k: float("inf") for k in runs}
    for _ in range(a.repeats):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    n = len(prompts)
    print(f"testbed, {n} prompts, threads {torch.get_num_threads()}, best of {a.repeats}")
    for k, v in best.items():
        print(f"  {k:10s} {v / n:.4f} s/prompt")
    print(f"  preview / generate  {best['preview'] / best['generate']:.3f}")
    print(f"  preview / sharpness {best['preview'] / best['sharpness']:.3f}")


if __name__ == "__main__":
    main()

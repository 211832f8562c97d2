"""Explanation cost benchmark (issue 5): attributing a batch of prompts vs detecting them.

Detection is :class:`diffmem.detect.NoiseMagnitude` (first step, one generation): one batched
cond+uncond UNet call. Attribution is :class:`diffmem.explain.TokenAttributor` (first step, one
seed): the unconditional prediction once per seed, then one batched UNet call with gradients and its
backward pass w.r.t. the text embeddings. Both encode the prompts and draw x_T the same way.

Each is run once to warm up, then ``--repeats`` times; the medians of wall-clock and of process CPU
time are printed with their ratio (CPU time is robust to other jobs sharing the machine).

Run: ``OMP_NUM_THREADS=1 nice -n 19 python bench/bench_explain.py [--model testbed] [--n 16]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from diffmem.detect import NoiseMagnitude
from diffmem.explain import TokenAttributor
from diffmem.models.adapter import load_adapter
from diffmem.testbed import shipped_testbed_spec
from diffmem.testbed.data import build_testbed


def _timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall-clock and CPU seconds of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def _prompts(n: int) -> list[str]:
    """``n`` testbed prompts, memorized and held-out mixed (cycled if fewer exist)."""
    labelled = build_testbed(shipped_testbed_spec()).prompts
    mixed = [p.prompt for pair in zip(labelled[: len(labelled) // 2], labelled[len(labelled) // 2:],
                                      strict=False) for p in pair]
    return [mixed[i % len(mixed)] for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="testbed")
    ap.add_argument("--n", type=int, default=16, help="prompts in the batch")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    adapter = load_adapter(a.model)
    prompts = _prompts(a.n)
    detector = NoiseMagnitude(steps=1, generations=1, batch_size=a.n)
    attributor = TokenAttributor(adapter, steps=1, seeds=1, batch_size=a.n)

    def detect() -> object:
        return detector.score(adapter, prompts)

    def attribute() -> object:
        return attributor.attribute(prompts)

    det_wall, det_cpu = _timed(detect, a.repeats)
    att_wall, att_cpu = _timed(attribute, a.repeats)
    print(f"model {a.model}, {a.n} prompts, torch threads {torch.get_num_threads()}, "
          f"median of {a.repeats}")
    print(f"detect    (NoiseMagnitude, 1 step):  wall {det_wall:.4f} s  cpu {det_cpu:.4f} s")
    print(f"attribute (TokenAttributor, 1 step): wall {att_wall:.4f} s  cpu {att_cpu:.4f} s")
    print(f"ratio attribute/detect: wall {att_wall / det_wall:.2f}x  cpu {att_cpu / det_cpu:.2f}x")


if __name__ == "__main__":
    main()

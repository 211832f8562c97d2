"""What Ren et al.'s BOS rescaling costs with explicit and with fused cross-attention, in one run.

Plain generation, ``ren`` through the explicit attention matrix (``AttentionRescale(fused=False)``:
logits, softmax and the product with V written out in every cross-attention layer) and ``ren``
through fused attention (the default: the BOS key row scaled by ``c`` and the key mask as an
additive mask, both handed to ``torch.nn.functional.scaled_dot_product_attention``). Every variant
generates the same batch (``--batch`` testbed prompts, seeds 0.., ``--steps`` DDIM steps) on the
shipped testbed; variants run interleaved in ``--repeats`` rounds after a warm-up and the minimum
is reported, so that load drifts hit all alike. It also prints how far the fused images are from
the explicit ones (they agree up to float rounding).

``--variants plain,ren`` times only those two (``ren``: the registry's default hook, whatever path
it takes), e.g. on a checkout before the fused path existed.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=src python bench/bench_ren_fused.py [--batch 8] [--steps 50]
[--repeats 3]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from diffmem.core.sampling import sample, seeded_generators
from diffmem.mitigate.registry import MitigationContext, build_mitigations
from diffmem.models.adapter import load_adapter
from diffmem.testbed import spec_of
from diffmem.testbed.data import build_testbed

VARIANTS = ("plain", "ren-explicit", "ren-fused")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated, of plain, ren, ren-explicit, ren-fused")
    a = p.parse_args()
    adapter = load_adapter("testbed")
    tb = build_testbed(spec_of(adapter))
    prompts = [x.prompt for x in tb.prompts if x.memorized][: a.batch]
    context = MitigationContext(adapter)

    def hooks(name: str) -> list:
        if name == "plain":
            return []
        out = build_mitigations("ren", context)
        if name != "ren":
            out[0].fused = name == "ren-fused"
        return out

    def run(name: str) -> torch.Tensor:
        res = sample(adapter, prompts, num_inference_steps=a.steps, hooks=hooks(name),
                     generator=seeded_generators(range(len(prompts))))
        return res.images

    names = a.variants.split(",")
    images = {k: run(k) for k in names}  # warm-up, and the outputs compared
    times: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(a.repeats):
        for key in names:
            t0 = time.perf_counter()
            run(key)
            times[key].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(prompts)} prompts, "
          f"{a.steps} steps; min of {a.repeats} rounds")
    for key, sec in best.items():
        extra = f"  x{sec / best['plain']:.3f} plain" if "plain" in best else ""
        if key == "ren-fused" and "ren-explicit" in best:
            extra += f"  x{sec / best['ren-explicit']:.3f} ren-explicit"
        print(f"{key:<13} {sec:7.3f} s{extra}")
    if "ren-fused" in images and "ren-explicit" in images:
        diff = (images["ren-fused"] - images["ren-explicit"]).abs().max().item()
        moved = (images["ren-explicit"] - images.get("plain", images["ren-explicit"])).abs().max()
        print(f"max |fused - explicit| over the images: {diff:.2e} "
              f"(|ren - plain| up to {moved.item():.2e})")


if __name__ == "__main__":
    main()

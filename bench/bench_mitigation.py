"""What inference-time mitigation costs: seconds per batch against plain generation, in one run.

Issue 11's cost targets: ``auto`` (gate + method) adds <= 2% on held-out (clean) prompts, whose
images stay bit-identical; guidance methods (Ren, Jain's delay, AMG's G_spe) cost <= 1.5x plain on
memorized prompts; Wen's, SAIL's (xt) and AMG G_sim's times reported beside them. With
``--index``, AMG runs whole and with one term alone (``amg G_spe``: the guidance-scale term,
with its per-step decode and search; ``amg G_sim``: the gradient term; ``/4``: decode and search
on every 4th step only, ``check_every=4``).

Every variant generates the same batch (16 prompts, seeds 0..15, 50 DDIM steps) on the shipped
testbed; variants run interleaved in ``--repeats`` rounds after a warm-up and the minimum is
reported, so that load drifts hit all alike. The ``auto`` variants also check bit-identity of the
held-out images.

Run: ``python bench/bench_mitigation.py [--repeats 3] [--index IDX]`` (AMG needs the testbed index:
``diffmem index build testbed --out IDX``).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from diffmem import load_adapter, sample, seeded_generators
from diffmem.mitigate import MitigationContext, build_mitigations
from diffmem.testbed import spec_of
from diffmem.testbed.data import build_testbed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--index", default=None, help="testbed index folder (adds AMG variants)")
    p.add_argument("--only", default=None, choices=("heldout", "memorized"),
                   help="time only this group's variants")
    p.add_argument("--no-decode", action="store_true", help="leave out the final VAE decode")
    a = p.parse_args()
    adapter = load_adapter("testbed")
    tb = build_testbed(spec_of(adapter))
    memorized = [x.prompt for x in tb.prompts if x.memorized][: a.batch]
    heldout = [x.prompt for x in tb.prompts if x.kind == "heldout"][: a.batch]
    index = None
    if a.index:
        from diffmem.similarity.index import TrainingIndex

        index = TrainingIndex.load(a.index)
    context = MitigationContext(adapter, index=index)
    context.require_threshold()  # calibrated once, outside the timings

    def amg_terms(**terms):  # AMG with some of its three terms switched off
        from diffmem.mitigate.amg import AntiMemorizationGuidance

        return lambda: [AntiMemorizationGuidance.from_context(1.0, None, context, **terms)]

    def run(prompts, spec):
        hooks = spec() if callable(spec) else build_mitigations(spec, context) if spec else []
        res = sample(adapter, prompts, num_inference_steps=a.steps, hooks=hooks,
                     generator=seeded_generators(range(len(prompts))), decode=not a.no_decode)
        return res.latents if a.no_decode else res.images

    variants = {
        "heldout/plain": partial(run, heldout, None),
        "heldout/auto": partial(run, heldout, "auto"),
        "heldout/auto,delay": partial(run, heldout, "auto,delay"),
        "memorized/plain": partial(run, memorized, None),
        "memorized/ren": partial(run, memorized, "ren"),
        "memorized/delay": partial(run, memorized, "delay"),
        "memorized/auto": partial(run, memorized, "auto"),
        "memorized/wen": partial(run, memorized, "wen"),
        "memorized/xt": partial(run, memorized, "xt"),
    }
    if index is not None:
        variants["heldout/auto,amg"] = partial(run, heldout, "auto,amg")
        variants["memorized/amg"] = partial(run, memorized, "amg")
        variants["memorized/amg G_spe"] = partial(run, memorized,
                                                  amg_terms(g_dup=False, g_sim=False))
        variants["memorized/amg G_sim"] = partial(run, memorized,
                                                  amg_terms(g_spe=False, g_dup=False))
        variants["memorized/amg G_spe /4"] = partial(
            run, memorized, amg_terms(g_dup=False, g_sim=False, check_every=4))
        variants["memorized/amg /4"] = partial(run, memorized, amg_terms(check_every=4))
    if a.only:
        variants = {k: fn for k, fn in variants.items() if k.startswith(a.only + "/")}
    images = {k: fn() for k, fn in variants.items()}  # warm-up, and the outputs compared
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.repeats):
        for key, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {a.batch}, "
          f"{a.steps} steps, threshold {context.threshold:.4f}; min of {a.repeats} rounds")
    for key, sec in best.items():
        group = key.split("/")[0]
        ratio = sec / best[f"{group}/plain"]
        same = ""
        if group == "heldout" and key != "heldout/plain":
            same = "  output bit-identical to plain: " + str(
                torch.equal(images[key], images["heldout/plain"]))
        print(f"{key:<22} {sec:7.3f} s  x{ratio:.3f} plain{same}")


if __name__ == "__main__":
    main()

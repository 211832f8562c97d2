"""What AMG's terms do alone on the testbed's memorized prompts: memorization rate (testbed
criterion) of G_spe alone, G_spe + G_dup (no G_sim), and AMG checking every 4th step only
(``check_every=4``, all terms and G_spe alone), 16 prompts x 4 seeds, as
``diffmem eval mitigation`` judges them (its prompt sample and judge).

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=src python bench/amg_terms.py --index idx/``.
"""

from __future__ import annotations

import argparse


def main() -> None:
    from diffmem import load_adapter
    from diffmem.eval.mitigation import _generate, _groups, _Judge
    from diffmem.mitigate import MitigationContext
    from diffmem.mitigate.amg import AntiMemorizationGuidance
    from diffmem.similarity.index import TrainingIndex

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True, help="the testbed index (diffmem index build testbed)")
    ap.add_argument("--max-per-group", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=4)
    a = ap.parse_args()
    adapter = load_adapter("testbed")
    groups, testbed = _groups(adapter, a.max_per_group, 0)
    judge = _Judge(adapter, testbed, with_sscd=False)
    prompts = groups["memorized"]
    context = MitigationContext(adapter, index=TrainingIndex.load(a.index))
    for name, terms in (("G_spe", {"g_dup": False, "g_sim": False}),
                        ("G_spe+G_dup", {"g_sim": False}),
                        ("all, check/4", {"check_every": 4}),
                        ("G_spe, /4", {"g_dup": False, "g_sim": False, "check_every": 4})):
        gen = _generate(adapter, [p.prompt for p in prompts],
                        lambda t=terms: [AntiMemorizationGuidance.from_context(1.0, None, context,
                                                                               **t)],
                        seeds=a.seeds, steps=50, guidance_scale=7.5, batch_size=64, desc=name)
        row = judge(gen, prompts, "memorized")
        print(f"{name:<12} memorization {row['memorization_rate']:.3f}  "
              f"mean tiled L2 {row['distance_mean']:.3f}  ({row['n_images']} images)")


if __name__ == "__main__":
    main()

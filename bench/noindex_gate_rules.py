"""Flag rules of the guard without an index, simulated on plain generations: which copying images
stay unflagged and which non-copying images get flagged, per group, when an image is flagged by
the first-step gate and/or the agreement check (with prompt-wide flags from the agreement check).
Input: the rows of ``bench/agreement_sweep.py`` (plain images of one split, 4 seeds a prompt);
the first-step noise magnitude of each image is computed here (one UNet step per image, the
guard's gate statistic and calibrated threshold) and added to the file.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/noindex_gate_rules.py runs/agree_dev.json

A flagged copying image is counted as served clean and an unflagged one as a copy (the guard's
ladder clears nearly every flagged copy, docs/mitigation.md), so the counts are of the flags.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path


def magnitudes(rows: list[dict]) -> float:
    """Add ``mag`` (first-step noise magnitude, 50 DDIM steps, guidance 7.5) to every row; return
    the model's calibrated gate threshold."""
    from diffmem.core.magnitude import noise_magnitude
    from diffmem.core.sampling import Hook, sample, seeded_generators
    from diffmem.mitigate.registry import default_threshold
    from diffmem.models.adapter import load_adapter

    class FirstStep(Hook):
        name = "first_step"

        def on_step(self, run, step) -> None:
            if step.index == 0:
                run.records["mag"] = noise_magnitude(step.eps_cond,
                                                     step.eps_uncond).cpu().tolist()
                run.stop = True

    adapter = load_adapter("testbed")
    for k in range(0, len(rows), 64):
        part = rows[k : k + 64]
        res = sample(adapter, [r["prompt"] for r in part], num_inference_steps=50,
                     guidance_scale=7.5, hooks=[FirstStep()],
                     generator=seeded_generators([r["seed"] for r in part]))
        for r, m in zip(part, res.records["mag"], strict=True):
            r["mag"] = m
    return float(default_threshold(adapter))


def simulate(rows: list[dict], threshold: float, rule) -> dict[str, str]:
    wide = {r["prompt"] for r in rows if r["agree"] is not None and r["agree"] < 0.09}
    out: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for r in rows:
        flagged = rule(r, threshold) or r["prompt"] in wide
        if r["copying_prompt"] and r["dist"] < 0.15:
            out[r["group"]][0] += not flagged
            out[r["group"]][1] += 1
        elif not r["copying_prompt"]:
            out[r["group"]][0] += flagged
            out[r["group"]][1] += 1
    return {g: f"{a}/{b}" for g, (a, b) in out.items()}


def _agrees(r: dict, t: float) -> bool:
    return r["agree"] is not None and r["agree"] < t


RULES = {
    "gate or agreement < 0.09 (before confirm_gate)":
        lambda r, thr: r["mag"] > thr or _agrees(r, 0.09),
    "agreement < 0.09 alone": lambda r, thr: _agrees(r, 0.09),
    "agreement < 0.09, or gate and agreement < 0.15 (confirm_gate)":
        lambda r, thr: _agrees(r, 0.09) or (r["mag"] > thr and _agrees(r, 0.15)),
}


def main() -> None:
    path = Path(sys.argv[1])
    data = json.loads(path.read_text())
    rows = data["rows"] if isinstance(data, dict) else data
    if isinstance(data, dict) and "threshold" in data:
        threshold = data["threshold"]
    else:
        threshold = magnitudes(rows)
        path.write_text(json.dumps({"threshold": threshold, "rows": rows}))
    print(f"gate threshold {threshold:.4f}; per group: copying images left unflagged / "
          "non-copying images flagged")
    for name, rule in RULES.items():
        print(f"{name}: {simulate(rows, threshold, rule)}")


if __name__ == "__main__":
    main()

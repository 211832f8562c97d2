"""The main job on the testbed (``make demo`` / ``diffmem demo``): detect, explain and measure.

1. detection: score every labelled testbed prompt with Wen et al.'s noise magnitude (first step,
   one generation) and report AUC / TPR at 1% FPR;
2. explanation: attribute one memorized prompt to its words and suggest edits;
3. replication: generate one image per prompt for a few memorized and held-out prompts and match
   each to the training set with the testbed's pixel index (tiled L2).
"""

from __future__ import annotations

from pathlib import Path

from diffmem.models.adapter import load_adapter
from diffmem.runtime.jsonio import write_json
from diffmem.testbed import require_spec


def run_demo(model: str | Path = "testbed", out: str | Path = "demo_out", *,
             n_replication: int = 4) -> dict:
    """Run the three parts and return (and write to ``out/summary.json``) their headline figures."""
    from diffmem.eval.detection import evaluate_detection
    from diffmem.explain import explain_prompt, format_terminal
    from diffmem.generate import generate, save_results
    from diffmem.similarity.report import eval_replication
    from diffmem.testbed.data import build_testbed
    from diffmem.testbed.index import build_testbed_index
    from diffmem.testbed.verify import REPLICATION_THRESHOLD

    adapter = load_adapter(model)
    testbed = build_testbed(require_spec(adapter, "the demo"))  # prompts and index
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    print("== 1. detection: noise magnitude (Wen et al. 2024), first step, one generation ==")
    det = evaluate_detection("noise_magnitude", model=adapter, out=out / "detection.json")
    print(f"   {det['n_positive']} memorized vs {det['n_negative']} held-out prompts: "
          f"AUC {det['auc']:.3f}, TPR@1%FPR {det['tpr_at_1pct_fpr']:.3f} "
          f"(ROC plot and per-prompt scores in {out})")

    print("\n== 2. explanation: which words trigger memorization ==")
    prompt = next(p for p in testbed.prompts if p.kind == "verbatim")
    exp = explain_prompt(adapter, prompt.prompt)
    print(format_terminal(exp))
    print(f"   (designed trigger words: {', '.join(prompt.trigger_tokens)})")

    print("\n== 3. replication against the training set (tiled L2, Carlini et al. 2023) ==")
    chosen = ([p for p in testbed.prompts if p.memorized][:n_replication]
              + [p for p in testbed.prompts if not p.memorized][:n_replication])
    texts = [p.prompt for p in chosen]
    results = generate(texts, model=adapter)
    save_results(texts, results, out / "images")
    index = build_testbed_index(spec=testbed.spec, rendered_by=adapter)
    rep = eval_replication(out / "images", index, out / "replication.json",
                           grid_html=out / "replication.html", threshold=REPLICATION_THRESHOLD)
    by_name = {Path(r["path"]).name: r for r in rep["per_image"]}
    for k, p in enumerate(chosen):
        r = by_name[f"{k:04d}.png"]
        verdict = "COPY" if r["score"] < REPLICATION_THRESHOLD else "novel"
        print(f"   [{p.kind:8s}] {verdict:5s} tiled-L2 {r['score']:.3f} to {r['nearest_id']:14s} "
              f"{p.prompt[:50]}")
    summary = {"detection": {k: det[k] for k in ("auc", "tpr_at_1pct_fpr", "tpr_at_3pct_fpr")},
               "explained_prompt": prompt.prompt,
               "top_words": [w for w, _ in exp.attribution.top(3)],
               "replication_rate_memorized": _rate(chosen, by_name, True),
               "replication_rate_heldout": _rate(chosen, by_name, False)}
    write_json(out / "summary.json", summary)
    print(f"\nsummary written to {out / 'summary.json'}; grid of copies in {out / 'replication.html'}")
    return summary


def _rate(chosen, by_name: dict, memorized: bool) -> float:
    from diffmem.testbed.verify import REPLICATION_THRESHOLD

    rows = [by_name[f"{k:04d}.png"]["score"] < REPLICATION_THRESHOLD
            for k, p in enumerate(chosen) if p.memorized == memorized]
    return sum(rows) / max(len(rows), 1)

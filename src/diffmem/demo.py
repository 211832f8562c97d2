"""The main job on the testbed (``make demo`` / ``diffmem demo``): detect, explain and measure.

1. detection: score every labelled testbed prompt with Wen et al.'s noise magnitude (first step,
   one generation) and report AUC / TPR at 1% FPR;
2. explanation: attribute one memorized prompt to its words and suggest edits;
3. replication: generate one image per prompt for a few memorized and held-out prompts and match
   each to the training set with the testbed's pixel index (tiled L2);
4. the guard (``--mitigate auto``): one memorized prompt generated plainly (a copy) and through the
   guard (not a copy), each beside its nearest training image, in ``guard.html``.
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
    print("\n== 4. the guard (--mitigate auto): plain vs guarded, from the same noise ==")
    guard_row = _guard_demo(adapter, index, chosen[0].prompt, out)
    summary = {"detection": {k: det[k] for k in ("auc", "tpr_at_1pct_fpr", "tpr_at_3pct_fpr")},
               "explained_prompt": prompt.prompt,
               "top_words": [w for w, _ in exp.attribution.top(3)],
               "replication_rate_memorized": _rate(chosen, by_name, True),
               "replication_rate_heldout": _rate(chosen, by_name, False),
               "guard": guard_row}
    write_json(out / "summary.json", summary)
    print(f"\nsummary written to {out / 'summary.json'}; grid of copies in {out / 'replication.html'}")
    return summary


def _rate(chosen, by_name: dict, memorized: bool) -> float:
    from diffmem.testbed.verify import REPLICATION_THRESHOLD

    rows = [by_name[f"{k:04d}.png"]["score"] < REPLICATION_THRESHOLD
            for k, p in enumerate(chosen) if p.memorized == memorized]
    return sum(rows) / max(len(rows), 1)


def _guard_demo(adapter, index, prompt: str, out: Path, seed: int = 0) -> dict:
    """``prompt`` generated plainly and through the guard from seed ``seed``; ``out/guard.html``
    shows both beside their nearest training images (the VAE renderings in ``index``)."""
    import base64
    import html
    import io

    from diffmem.core.sampling import sample, seeded_generators
    from diffmem.mitigate.guard import Guard
    from diffmem.models.adapter import ModelAdapter
    from diffmem.testbed.verify import REPLICATION_THRESHOLD

    plain = sample(adapter, [prompt], generator=seeded_generators([seed])).images
    guarded = Guard(adapter, index=index).generate([prompt], [seed])
    verdict = guarded.verdicts[0]

    def png(t) -> str:
        buf = io.BytesIO()
        ModelAdapter.to_pil(t[None] if t.ndim == 3 else t)[0].save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    cells, row = [], {"prompt": prompt, "seed": seed, "verdict": verdict.to_json()}
    for name, img in (("plain", plain[0]), ("guarded", guarded.images[0])):
        found = index.search(img[None].float().clamp(-1, 1).cpu(), k=1)
        dist, ref = float(found.scores[0, 0]), int(found.indices[0, 0])
        copy = dist < REPLICATION_THRESHOLD
        row[name] = {"nearest": found.ids[0][0], "tiled_l2": round(dist, 4), "copy": copy}
        print(f"   {name:8s} tiled-L2 {dist:.3f} to {found.ids[0][0]:14s} "
              f"{'COPY' if copy else 'not a copy'}")
        cells.append(f"<figure><img src='data:image/png;base64,{png(img)}' width=192>"
                     f"<img src='data:image/png;base64,{png(index.image(ref))}' width=192>"
                     f"<figcaption>{name}: tiled L2 {dist:.3f} to {html.escape(found.ids[0][0])} "
                     f"({'a copy' if copy else 'not a copy'}; copy below "
                     f"{REPLICATION_THRESHOLD})</figcaption></figure>")
    v = verdict
    note = (f"guard verdict: {v.status}" + (f" with {v.method}, flagged by {v.watch} at step "
                                           f"{v.fired_at}, {v.tries} tr{'y' if v.tries == 1 else 'ies'}"
                                           if v.status != "clean" else ""))
    print(f"   {note}")
    (out / "guard.html").write_text(
        "<!doctype html><meta charset=utf-8><title>diffmem guard</title>"
        f"<h1>{html.escape(prompt)} (seed {seed})</h1><p>left of each pair: the generation; right: "
        f"its nearest training image</p>{''.join(cells)}<p>{html.escape(note)}</p>",
        encoding="utf-8")
    return row


"""``diffmem explain`` and ``diffmem eval explanation``: parsing and printing only.

The work is done by :func:`diffmem.explain.explain_prompt` and
:func:`diffmem.explain.evaluate_explanation`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def _write_json(path: str, obj: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(x: object) -> object:
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)


def cmd_explain(a: argparse.Namespace) -> int:
    from diffmem.explain import explain_prompt, format_terminal, to_html

    exp = explain_prompt(a.model, a.prompt, steps=a.steps, seeds=a.seeds, seed=a.seed,
                         top_k=a.top_k, combine=a.top_k, threshold=a.threshold,
                         attention=bool(a.html), num_inference_steps=a.inference_steps)
    print(format_terminal(exp, top_k=a.top_k))
    if a.json:
        _write_json(a.json, exp.to_dict())
        print(f"wrote {a.json}")
    if a.html:
        Path(a.html).parent.mkdir(parents=True, exist_ok=True)
        Path(a.html).write_text(to_html(exp), encoding="utf-8")
        print(f"wrote {a.html}")
    return 0


def cmd_eval_explanation(a: argparse.Namespace) -> int:
    from diffmem.explain import evaluate_explanation

    report = evaluate_explanation(a.model, prompts=a.prompts, top_k=a.top_k, combine=a.top_k,
                                  steps=a.steps, seeds=a.seeds, seed=a.seed,
                                  threshold=a.threshold, fpr=a.fpr,
                                  num_inference_steps=a.inference_steps,
                                  judge_edits=not a.no_judge, judge_seeds=a.judge_seeds)
    _write_json(a.out, report)
    summary = {k: v for k, v in report.items() if k != "prompts"}
    print(json.dumps(summary, indent=2, default=_jsonable))
    print(f"wrote {a.out}")
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="testbed",
                   help="pipeline folder (SD 1.x/2.x) or 'testbed' (default)")
    p.add_argument("--threshold", type=float, default=None,
                   help="detector threshold (default: fitted at 1%% FPR on the testbed's clean "
                        "controls)")
    p.add_argument("--steps", type=int, default=1, help="attribute at the first N steps")
    p.add_argument("--seeds", type=int, default=1, help="initial noises per prompt")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--top-k", type=int, default=5,
                   help="words to edit, alone and the top 2..k together")
    p.add_argument("--inference-steps", type=int, default=50,
                   help="denoising steps that define the timesteps")


def register(commands, eval_commands) -> None:
    """Add ``explain`` to the top-level commands and ``explanation`` to ``diffmem eval``."""
    e = commands.add_parser("explain", help="which words of a prompt drive memorization")
    e.add_argument("prompt")
    e.add_argument("--json", default=None, help="write words, scores and suggestions here")
    e.add_argument("--html", default=None,
                   help="write a self-contained page with per-word heat maps here")
    _add_common(e)
    e.set_defaults(func=cmd_explain)
    v = eval_commands.add_parser("explanation",
                                 help="trigger recall and edit success on the testbed")
    v.add_argument("--out", required=True, help="report JSON")
    v.add_argument("--fpr", type=float, default=0.01, help="false-positive rate of the threshold")
    v.add_argument("--prompts", default=None,
                   help="'broad' (generation labels; default for the shipped testbed), "
                        "'designed' or a labels JSONL of `diffmem testbed label`")
    v.add_argument("--no-judge", action="store_true",
                   help="do not generate the suggested edits (detector verdicts only)")
    v.add_argument("--judge-seeds", type=int, default=4,
                   help="generations per suggested edit when judging by images")
    _add_common(v)
    v.set_defaults(func=cmd_eval_explanation)

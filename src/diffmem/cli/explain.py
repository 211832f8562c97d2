"""``diffmem explain`` and ``diffmem eval explanation``: parsing and printing only.

The work is done by :func:`diffmem.explain.explain_prompt` and
:func:`diffmem.eval.explanation.evaluate_explanation`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffmem.cli._index import add_index_options, command_index
from diffmem.cli.args import (
    COUNT,
    FPR,
    GENERATIONS,
    NONNEG,
    SAMPLING_STEPS,
    SEED,
    STEPS_HELP,
    THRESHOLD,
    UNIT,
    DeprecatedAlias,
    Number,
    OutFile,
    add_model,
    scored_steps,
)
from diffmem.runtime.defaults import SAMPLING
from diffmem.runtime.jsonio import dumps, write_json

MARGIN = Number(float, min=1, max=100)

#: the tuning options of --verify-index: (flag, type, default, help)
VERIFY_OPTIONS = (
    ("--verify-seeds", GENERATIONS, 4, "generations per checked edit"),
    ("--verify-pool", GENERATIONS, 8,
     "seeds 1000 .. 1000+N-1 the original prompt is generated with first; its edits are checked "
     "on the --verify-seeds of them under which it comes closest to a training image"),
    ("--verify-confirm", NONNEG, None,
     "an edit that passes is generated again with this many more seeds of the pool (the next "
     "closest) and must pass there too (default: the rest of the pool; 0: no confirmation)"),
    ("--verify-checks", COUNT, 12, "edits generated per flagged prompt (and level) at most"),
    ("--verify-depth", COUNT, 2,
     "levels of editing: with 2, when no edit passes, the checked edit that stayed farthest from "
     "a copy is attributed and edited again; 1: one level"),
    ("--verify-margin", MARGIN, 1.0,
     "an edit passes when its closest generation stays this many times away from the copy "
     "threshold"),
)

#: shown in --help; the default itself is diffmem.explain._ablation.DEFAULT_ABLATION (this module
#: is loaded without torch, so it cannot import it; a test keeps the two equal)
ABLATION_HELP_DEFAULT = 0.5


def _ablation(a: argparse.Namespace) -> dict:
    return {} if a.ablation is None else {"ablation": a.ablation}


def _verify(a: argparse.Namespace) -> dict:
    """``verify=`` (edits checked by generation) from --verify-index, else from --index."""
    where = a.verify_index if a.verify_index is not None else a.index
    if where is None:
        return {}
    from diffmem.explain import EditVerifier

    return {"verify": EditVerifier(where, seeds=a.verify_seeds,
                                   max_checks=a.verify_checks, margin=a.verify_margin,
                                   pool=a.verify_pool, confirm=a.verify_confirm,
                                   depth=a.verify_depth,
                                   num_inference_steps=a.sampling_steps)}


def _write_json(path: str, obj: dict) -> None:
    write_json(path, obj)


def cmd_explain(a: argparse.Namespace) -> int:
    from diffmem.explain import explain_prompt, format_terminal, to_html

    choice, model = command_index(a, a.model)  # --index, else the one `calibrate` stored
    a.index = choice.index
    exp = explain_prompt(model, a.prompt, steps=a.steps, seeds=a.seeds, seed=a.seed,
                         top_k=a.top_k, combine=a.top_k, threshold=a.threshold,
                         attention=bool(a.html), num_inference_steps=a.sampling_steps,
                         index=a.index, **_ablation(a), **_verify(a))
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
    from diffmem.eval.explanation import evaluate_explanation

    report = evaluate_explanation(a.model, prompts=a.prompts, top_k=a.top_k, combine=a.top_k,
                                  steps=a.steps, seeds=a.seeds, seed=a.seed,
                                  threshold=a.threshold, fpr=a.fpr,
                                  num_inference_steps=a.sampling_steps,
                                  judge_edits=not a.no_judge, judge_seeds=a.judge_seeds,
                                  index=a.index, split=a.split,
                                  max_per_group=a.max_per_group, **_ablation(a), **_verify(a))
    _write_json(a.out, report)
    summary = {k: v for k, v in report.items() if k != "prompts"}
    print(dumps(summary, indent=2))
    print(f"wrote {a.out}")
    return 0


INDEX_HELP = ("the training set's index (`diffmem index build`): the verdict 'copies / does not "
              "copy' comes from 4 generated previews of 20 steps searched in it (the first-step "
              "score stays a fast estimate), and the edits are checked by generation against it "
              "(as --verify-index). Without it the verdict is the first-step estimate")


def _add_common(p: argparse.ArgumentParser, *, testbed_only: bool = False,
                stored_index: bool = False) -> None:
    add_model(p, testbed_only=testbed_only)
    p.add_argument("--threshold", type=THRESHOLD, default=None,
                   help="detector threshold (default: fitted at 1%% FPR on the testbed's clean "
                        "controls, or stored by `diffmem calibrate`)")
    p.add_argument("--steps", type=scored_steps, default=1,
                   help=STEPS_HELP.replace("scored", "attributed"))
    p.add_argument("--seeds", type=GENERATIONS, default=1, help="initial noises per prompt")
    p.add_argument("--seed", type=SEED, default=0, help="first seed")
    p.add_argument("--top-k", type=COUNT, default=5,
                   help="words to edit, alone and the top 2..k together")
    p.add_argument("--ablation", type=UNIT, default=None,
                   help="weight of word ablation (the magnitude's fall when a word is removed) in "
                        "the word ranking; 0 = Wen et al.'s gradient attribution alone (default: "
                        f"{ABLATION_HELP_DEFAULT})")
    v = p.add_argument_group("verdict and edit verification (need the training set's index)")
    if stored_index:  # explain: --index, else the index `diffmem calibrate --index` stored
        add_index_options(v, INDEX_HELP)
    else:
        v.add_argument("--index", default=None, metavar="IDX", help=INDEX_HELP)
    v.add_argument("--verify-index", default=None, metavar="IDX",
                   help="check the edits of a flagged prompt by generating them and searching this "
                        "training-set index (`diffmem index build`); only an edit that copies "
                        "nothing is suggested")
    for flag, kind, default, text in VERIFY_OPTIONS:
        v.add_argument(flag, type=kind, default=default, help=text,
                       metavar="M" if kind is MARGIN else "N")
    p.add_argument("--sampling-steps", type=SAMPLING_STEPS, default=SAMPLING.steps,
                   help="length of the denoising schedule (defines the timesteps)")
    p.add_argument("--inference-steps", dest="sampling_steps", type=SAMPLING_STEPS,
                   action=DeprecatedAlias, new="--sampling-steps", help=argparse.SUPPRESS,
                   default=argparse.SUPPRESS)


def register(commands, eval_commands) -> None:
    """Add ``explain`` to the top-level commands and ``explanation`` to ``diffmem eval``."""
    e = commands.add_parser("explain", help="which words of a prompt drive memorization")
    e.add_argument("prompt", help="the prompt to explain (quote it)")
    e.add_argument("--json", type=OutFile(".json"), default=None,
                   help="write words, scores and suggestions here")
    e.add_argument("--html", type=OutFile(".html", ".htm"), default=None,
                   help="write a self-contained page with per-word heat maps here")
    _add_common(e, stored_index=True)
    e.set_defaults(func=cmd_explain)
    v = eval_commands.add_parser("explanation",
                                 help="trigger recall and edit success on the testbed")
    v.add_argument("--out", type=OutFile(".json"), required=True, help="report JSON")
    v.add_argument("--fpr", type=FPR, default=0.01,
                   help="false-positive rate of the threshold, in (0, 1)")
    v.add_argument("--prompts", default=None,
                   help="'broad' (generation labels; default for the shipped testbed), "
                        "'designed' or a labels JSONL of `diffmem testbed label`")
    v.add_argument("--no-judge", action="store_true",
                   help="do not generate the suggested edits (detector verdicts only)")
    v.add_argument("--judge-seeds", type=GENERATIONS, default=4,
                   help="generations per suggested edit when judging by images")
    v.add_argument("--split", choices=("dev", "test"), default=None,
                   help="only the labelled prompts of this split (default: both)")
    v.add_argument("--max-per-group", type=COUNT, default=None,
                   help="only the first N copying prompts (and N controls) of each group")
    _add_common(v, testbed_only=True)
    v.set_defaults(func=cmd_eval_explanation)

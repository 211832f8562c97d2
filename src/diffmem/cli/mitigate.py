"""Command-line parsing of ``diffmem eval mitigation`` (``generate --mitigate`` is in cli.py).

    diffmem eval mitigation --methods wen,ren,amg,...,auto --out m.json [--plot tradeoff.png]
    diffmem eval mitigation --broad [--index IDX] [--split test] --out g.json   # = eval guard
                            [--strengths 0.5,1,2] [--seeds 4] [--index IDX] [--max-per-group N]
"""

from __future__ import annotations

import argparse
import json
import math

from diffmem.cli.args import (
    BATCH,
    COUNT,
    GENERATIONS,
    GUIDANCE,
    SAMPLING_STEPS,
    THRESHOLD,
    OutFile,
    add_model,
    add_sampling,
)
from diffmem.runtime.defaults import SAMPLING
from diffmem.runtime.errors import ConfigError


def _floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--strengths must be comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise ConfigError(f"--strengths must be finite numbers >= 0, got {text!r}")
    return values


def _strengths(text: str) -> str:
    """argparse type: checks ``--strengths`` at parse time, keeps the text."""
    try:
        _floats(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _cmd_eval_mitigation(a: argparse.Namespace) -> int:
    from diffmem.eval.mitigation import evaluate_mitigation

    if a.broad:  # the guard on every generation-labelled group: the report of `eval guard`
        if a.methods not in (None, "auto"):
            raise ConfigError("--broad evaluates the guard (--methods auto) on every group of the "
                              "broad set; evaluate other methods without --broad")
        return _cmd_eval_guard(argparse.Namespace(
            **{**vars(a), "groups": None, "scheduler": None, "batch_size": 32}))
    if a.methods is None:
        raise ConfigError("give --methods (or --broad: the guard on every group of the broad set)")
    report = evaluate_mitigation(
        [m for m in a.methods.split(",") if m.strip()], model=a.model,
        strengths=_floats(a.strengths), seeds=a.seeds, steps=a.sampling_steps,
        guidance_scale=a.guidance_scale, index=a.index, threshold=a.threshold,
        max_per_group=a.max_per_group, with_sscd=not a.no_sscd, batch_size=a.batch_size,
        out=a.out, plot=a.plot)
    keys = ("method", "group", "memorization_rate", "alignment", "fpd", "changed_share",
            "time_ratio")
    print(json.dumps([{k: r.get(k) for k in keys if k in r} for r in report["rows"]], indent=1))
    return 0


def _cmd_eval_guard(a: argparse.Namespace) -> int:
    from diffmem.eval.guard import evaluate_guard
    report = evaluate_guard(a.model, index=a.index, split=a.split, seeds=a.seeds,
                            groups=[g for g in (a.groups or "").split(",") if g] or None,
                            max_per_group=a.max_per_group, without_index=not a.index_only,
                            hand_made=a.hand_made, steps=a.sampling_steps,
                            guidance_scale=a.guidance_scale, batch_size=a.batch_size,
                            scheduler=a.scheduler, out=a.out)
    keys = ("group", "setting", "plain_copy_rate", "served_copy_rate", "unresolved",
            "bit_identical", "alignment_ratio", "cost")
    print(json.dumps([{k: r[k] for k in keys if k in r} for r in report["rows"]], indent=1))
    return 0


def register(commands: argparse._SubParsersAction, eval_commands: argparse._SubParsersAction
             ) -> None:
    """Add ``eval mitigation`` and ``eval guard``."""
    g = eval_commands.add_parser(
        "guard", help="what the closed-loop guard (--mitigate auto) serves on every "
                      "generation-labelled group of the broad set, with and without the index")
    g.add_argument("--out", type=OutFile(".json"), required=True, help="report JSON")
    g.add_argument("--index", default=None, help="training-set index folder")
    g.add_argument("--split", choices=("dev", "test", "all"), default="test",
                   help="split of the broad set (defaults were chosen on dev)")
    g.add_argument("--seeds", type=GENERATIONS, default=4, help="images per prompt (seeds 0..N-1)")
    g.add_argument("--groups", default=None, help="comma-separated groups (default: all)")
    g.add_argument("--max-per-group", type=COUNT, default=None, help="first N prompts per group")
    g.add_argument("--index-only", action="store_true", help="skip the run without the index")
    g.add_argument("--hand-made", default=None, metavar="FILE",
                   help="also a prompt file of your own, reported apart (labelled by its own "
                        "plain generations)")
    g.add_argument("--batch-size", type=BATCH, default=32, help="images per batched run")
    add_model(g, testbed_only=True)
    add_sampling(g)
    g.set_defaults(func=_cmd_eval_guard)

    e = eval_commands.add_parser(
        "mitigation", help="memorization rate, alignment, quality and cost of inference-time "
                           "mitigations on the testbed, judged by generated images")
    e.add_argument("--methods", default=None,
                   help="comma-separated specs; '+' composes (ren+amg); auto gates; "
                        "a method may carry :STRENGTH")
    e.add_argument("--broad", action="store_true",
                   help="the closed-loop guard (--mitigate auto) on every generation-labelled "
                        "group of the broad set, per group, with and without --index (the "
                        "report of `eval guard`; with --split, --hand-made, --index-only)")
    e.add_argument("--split", choices=("dev", "test", "all"), default="test",
                   help="with --broad: split of the broad set (defaults were chosen on dev)")
    e.add_argument("--hand-made", default=None, metavar="FILE",
                   help="with --broad: also a prompt file of your own, reported apart")
    e.add_argument("--index-only", action="store_true",
                   help="with --broad: skip the run without the index")
    e.add_argument("--strengths", type=_strengths, default=None,
                   help="comma-separated strengths applied to every method without one")
    e.add_argument("--out", type=OutFile(".json"), required=True,
                   help="report JSON (rewritten after each method)")
    e.add_argument("--plot", type=OutFile(".png"), default=None,
                   help="trade-off PNG (memorization vs alignment)")
    add_model(e, testbed_only=True)
    e.add_argument("--seeds", type=GENERATIONS, default=4, help="images per prompt")
    e.add_argument("--sampling-steps", type=SAMPLING_STEPS, default=SAMPLING.steps,
                   help="length of the denoising schedule")
    e.add_argument("--guidance-scale", type=GUIDANCE, default=SAMPLING.guidance_scale,
                   help="classifier-free guidance scale (finite, >= 0)")
    e.add_argument("--index", default=None, help="training-set index folder (for amg)")
    e.add_argument("--threshold", type=THRESHOLD, default=None,
                   help="gate / wen threshold (default: calibrated on held-out prompts)")
    e.add_argument("--max-per-group", type=COUNT, default=None,
                   help="at most this many prompts per group (random, seeded)")
    e.add_argument("--no-sscd", action="store_true", help="skip the SSCD side metric")
    e.add_argument("--batch-size", type=BATCH, default=64, help="images per batched run")
    e.set_defaults(func=_cmd_eval_mitigation)

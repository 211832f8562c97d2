"""Command-line parsing of ``diffmem eval mitigation`` (``generate --mitigate`` is in cli.py).

    diffmem eval mitigation --methods wen,ren,amg,...,auto --out m.json [--plot tradeoff.png]
                            [--strengths 0.5,1,2] [--seeds 4] [--index IDX] [--max-per-group N]
"""

from __future__ import annotations

import argparse
import json

from diffmem.errors import ConfigError


def _floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--strengths must be comma-separated numbers, got {text!r}") from None


def _cmd_eval_mitigation(a: argparse.Namespace) -> int:
    from diffmem.eval.mitigation import evaluate_mitigation

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


def register(commands: argparse._SubParsersAction, eval_commands: argparse._SubParsersAction
             ) -> None:
    """Add ``eval mitigation``."""
    e = eval_commands.add_parser(
        "mitigation", help="memorization rate, alignment, quality and cost of inference-time "
                           "mitigations on the testbed, judged by generated images")
    e.add_argument("--methods", required=True,
                   help="comma-separated specs; '+' composes (ren+amg); auto gates; "
                        "a method may carry :STRENGTH")
    e.add_argument("--strengths", default=None,
                   help="comma-separated strengths applied to every method without one")
    e.add_argument("--out", required=True, help="report JSON (rewritten after each method)")
    e.add_argument("--plot", default=None, help="trade-off PNG (memorization vs alignment)")
    e.add_argument("--model", default="testbed", help="a testbed model folder or 'testbed'")
    e.add_argument("--seeds", type=int, default=4, help="images per prompt")
    e.add_argument("--sampling-steps", type=int, default=50, help="denoising steps")
    e.add_argument("--guidance-scale", type=float, default=7.5)
    e.add_argument("--index", default=None, help="training-set index folder (for amg)")
    e.add_argument("--threshold", type=float, default=None,
                   help="gate / wen threshold (default: calibrated on held-out prompts)")
    e.add_argument("--max-per-group", type=int, default=None,
                   help="at most this many prompts per group (random, seeded)")
    e.add_argument("--no-sscd", action="store_true", help="skip the SSCD side metric")
    e.add_argument("--batch-size", type=int, default=64)
    e.set_defaults(func=_cmd_eval_mitigation)

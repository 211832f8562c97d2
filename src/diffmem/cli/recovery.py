"""Command-line parsing of the recovery check; each command calls one library function.

    diffmem eval recovery --model M [--mitigate SPEC] [--index DIR] [--optimize-noise] --out r.json
    diffmem eval recovery-plot NAME=r.json [...] --out plot.png
"""

from __future__ import annotations

import argparse
import json

from diffmem.cli.args import BATCH, COUNT, GENERATIONS, NONNEG, SEED, THRESHOLD, OutFile, add_model


def _cmd_recovery(a: argparse.Namespace) -> int:
    from diffmem.eval.recovery import evaluate_recovery

    r = evaluate_recovery(a.model, mitigate=a.mitigate, index=a.index, threshold=a.threshold,
                          manifest=a.manifest, iterations=a.iterations, lr=a.lr,
                          check_every=a.check_every, seeds=a.seeds,
                          optimize_noise=a.optimize_noise, start_prompt=a.start_prompt,
                          seed=a.seed, max_items=a.max_items, batch_size=a.batch_size, out=a.out)
    med = r["iterations_to_recovery_median"]
    print(f"{r['mitigation']} on {r['model']}: {r['recovered_share']:.3f} of {r['n_items']} "
          f"memorized items recoverable within {r['budget']} iterations (copies at start "
          f"{r['recovered_at_start']:.3f}, at end {r['recovered_at_end']:.3f}; median iterations "
          f"to recovery {'-' if med is None else f'{med:g}'})"
          + (f"; wrote {a.out}" if a.out else ""))
    return 0


def _cmd_recovery_plot(a: argparse.Namespace) -> int:
    from pathlib import Path

    from diffmem.eval.recovery_report import (
        plot_recovery,
        recovery_chart,
        recovery_curve_table,
        recovery_table,
    )

    reports = {}
    for spec in a.reports:
        name, sep, file = spec.partition("=")
        if not sep:
            name, file = Path(spec).stem, spec
        reports[name] = json.loads(Path(file).read_text())
    print(recovery_table(reports))
    print("share recovered by iteration:\n")
    print(recovery_curve_table(reports))
    print(recovery_chart(reports))
    print(f"wrote {plot_recovery(reports, a.out)}")
    return 0


def register(commands: argparse._SubParsersAction, eval_commands: argparse._SubParsersAction
             ) -> None:
    """Add ``eval recovery`` and ``eval recovery-plot``."""
    from diffmem.runtime.defaults import RECOVERY as d

    r = eval_commands.add_parser(
        "recovery", help="can memorized items still be reached by optimising a text embedding "
                         "under this model and mitigation? (Finding Dori; docs/training.md)")
    add_model(r)
    r.add_argument("--mitigate", default=None, metavar="SPEC",
                   help="mitigation the generations run under (as `diffmem generate --mitigate`; "
                        "'auto': the guard); default none")
    r.add_argument("--index", default=None, help="training-set index folder (the guard, amg)")
    r.add_argument("--threshold", type=THRESHOLD, default=None,
                   help="first-step noise-magnitude threshold of auto / wen (default: calibrated)")
    r.add_argument("--manifest", default=None,
                   help="planted manifest.json listing the items (default: from the model: its "
                        "testbed prompts, or the planted set it was fine-tuned on)")
    r.add_argument("--iterations", type=NONNEG, default=d["iterations"],
                   help="optimisation budget per item")
    r.add_argument("--lr", type=THRESHOLD, default=d["lr"], help="Adam learning rate")
    r.add_argument("--check-every", type=COUNT, default=d["check_every"],
                   help="iterations between generations that judge recovery")
    r.add_argument("--seeds", type=GENERATIONS, default=d["seeds"],
                   help="generations per item and check")
    r.add_argument("--optimize-noise", action="store_true",
                   help="also optimise each generation's initial noise x_T")
    r.add_argument("--start-prompt", default=d["start_prompt"],
                   help="the neutral prompt whose embedding every item starts from")
    r.add_argument("--seed", type=SEED, default=d["seed"], help="seed of the optimisation")
    r.add_argument("--max-items", type=COUNT, default=None, help="only the first N items")
    r.add_argument("--batch-size", type=BATCH, default=32, help="generations per batched run")
    r.add_argument("--out", type=OutFile(".json"), default=None, help="report JSON")
    r.set_defaults(func=_cmd_recovery)

    p = eval_commands.add_parser("recovery-plot",
                                 help="table and plot of several `eval recovery` reports")
    p.add_argument("reports", nargs="+", metavar="[NAME=]FILE", help="recovery report JSONs")
    p.add_argument("--out", type=OutFile(".png"), required=True, help="plot PNG")
    p.set_defaults(func=_cmd_recovery_plot)

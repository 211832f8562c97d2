"""Command-line parsing of the image-metric commands; each calls one library function.

    diffmem eval alignment IMAGES [--clip CLIP_DIR [--arch A]] [--no-attributes] [--out report.json]
    diffmem eval quality REAL|testbed GENERATED --features sscd|probe|inception [--inception PT]
    diffmem eval probe-train --out PREFIX [--steps N] [--seed S]
    diffmem eval dose --labels [NAME=]FILE [...] --out report.json [--plot p.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffmem.cli.args import BATCH, COUNT, SEED, DeprecatedAlias, OutFile
from diffmem.runtime.jsonio import dumps


def _cmd_alignment(a: argparse.Namespace) -> int:
    from diffmem.eval.reports import eval_alignment

    report = eval_alignment(a.images, a.out, clip=a.clip, arch=a.arch, probe=a.probe,
                            attributes=not a.no_attributes, batch_size=a.batch_size)
    print(dumps({k: v for k, v in report.items() if k != "per_image"}, indent=2))
    return 0


def _cmd_quality(a: argparse.Namespace) -> int:
    from diffmem.eval.reports import eval_quality

    print(dumps(eval_quality(a.real, a.generated, a.out, features=a.features,
                                  inception=a.inception, max_real=a.max_real,
                                  batch_size=a.batch_size), indent=2))
    return 0


def _cmd_probe_train(a: argparse.Namespace) -> int:
    from diffmem.eval.probe import train_attribute_probe

    probe = train_attribute_probe(a.out, steps=a.steps, seed=a.seed, progress=True)
    print(dumps(probe.metrics, indent=2))
    return 0


def _cmd_dose(a: argparse.Namespace) -> int:
    from diffmem.eval.dose import dose_chart, dose_report, dose_table, plot_dose_response
    from diffmem.runtime.jsonio import write_json
    from diffmem.testbed.broad import read_broad_labels

    methods: dict[str, dict] = {}
    for spec in a.labels:
        name, sep, file = spec.partition("=")
        if not sep:
            name, file = Path(spec).stem, spec
        rows = read_broad_labels(file)
        if a.group:
            rows = [r for r in rows if r.get("group") in a.group or int(r.get("duplicates") or 0) == 0]
        methods[name] = {"labels": file, **dose_report(rows)}
    report = {"groups": a.group or "all", "methods": methods}
    if a.plot is not None:
        report["plot"] = str(plot_dose_response(
            {n: m["counts"] for n, m in methods.items()}, a.plot,
            baselines={n: m["clean"]["copy_rate"] for n, m in methods.items() if "clean" in m}))
    report["table"] = dose_table({n: m["counts"] for n, m in methods.items()})
    report["chart"] = dose_chart({n: m["counts"] for n, m in methods.items()})
    write_json(a.out, report)
    for name, m in methods.items():
        rates = ", ".join(f"{r['duplicates']}: {r['copy_rate']:.3f}" for r in m["counts"])
        print(f"{name}: copy rate by duplicate count {rates}"
              + (f"; clean controls {m['clean']['copy_rate']:.3f}" if "clean" in m else ""))
    print(report["table"])
    print(report["chart"])
    print(f"wrote {a.out}")
    return 0


def register(commands: argparse._SubParsersAction, eval_commands: argparse._SubParsersAction
             ) -> None:
    """Add ``eval alignment``, ``eval quality``, ``eval probe-train`` and ``eval dose``."""
    al = eval_commands.add_parser("alignment", help="CLIP score / testbed attribute alignment of "
                                                    "captioned images")
    al.add_argument("images", help="a `diffmem generate` folder, or x.png + x.txt files")
    al.add_argument("--clip", default=None, help="local CLIP: Hugging Face folder or open_clip file")
    al.add_argument("--arch", default=None, help="open_clip architecture (open_clip files only)")
    al.add_argument("--probe", default=None, help="attribute probe weights (default: shipped)")
    al.add_argument("--no-attributes", action="store_true", help="skip the testbed attribute probe")
    al.add_argument("--out", type=OutFile(".json"), default=None,
                    help="report JSON with per-image scores")
    al.add_argument("--batch-size", type=BATCH, default=32, help="images per batch")
    al.set_defaults(func=_cmd_alignment)

    q = eval_commands.add_parser("quality", help="Fréchet distance (FID / FSD / FPD) of two image sets")
    q.add_argument("real", help="folder of real images, or 'testbed' (rendered testbed images)")
    q.add_argument("generated", help="folder of generated images")
    q.add_argument("--features", choices=("sscd", "probe", "inception"), default="sscd",
                   help="sscd: FSD (offline, default); probe: FPD (testbed); inception: FID")
    q.add_argument("--inception", default=None, help="inception-2015-12-05.pt (for FID)")
    q.add_argument("--max-real", type=COUNT, default=10000,
                   help="use at most this many real images")
    q.add_argument("--out", type=OutFile(".json"), default=None, help="report JSON")
    q.add_argument("--batch-size", type=BATCH, default=32, help="images per batch")
    q.set_defaults(func=_cmd_quality)

    p = eval_commands.add_parser("probe-train", help="retrain the testbed attribute probe")
    p.add_argument("--out", required=True, help="output prefix (writes .safetensors and .json)")
    p.add_argument("--train-steps", dest="steps", type=COUNT, default=None,
                   help="optimizer steps (default: ProbeConfig.steps)")
    p.add_argument("--steps", dest="steps", type=COUNT, action=DeprecatedAlias,
                   new="--train-steps", help=argparse.SUPPRESS, default=argparse.SUPPRESS)
    p.add_argument("--seed", type=SEED, default=None, help="default: ProbeConfig.seed")
    p.set_defaults(func=_cmd_probe_train)

    d = eval_commands.add_parser("dose", help="copy rate by training duplicate count (the graded "
                                              "testbed's labels)")
    d.add_argument("--labels", action="append", required=True, metavar="[NAME=]FILE",
                   help="labels JSONL with 'duplicates' per row (`diffmem testbed label --model "
                        "testbed-graded`), or rows with a 'copied' flag list per generation; "
                        "repeat for several methods (NAME: the plot's legend; default: the file "
                        "name)")
    d.add_argument("--group", action="append", default=None, metavar="GROUP",
                   help="only prompts of this broad-set group (repeatable; e.g. caption)")
    d.add_argument("--out", type=OutFile(".json"), required=True, help="report JSON")
    d.add_argument("--plot", type=OutFile(".png"), default=None,
                   help="copy rate vs. duplicate count (log x), one line per method")
    d.set_defaults(func=_cmd_dose)

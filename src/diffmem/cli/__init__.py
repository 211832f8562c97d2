"""The ``diffmem`` command line. Each command parses, calls one library function, and prints.

Errors from bad input (:class:`diffmem.runtime.errors.DiffmemError`) are printed as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from diffmem.cli import _ddpm
from diffmem.cli._generate import _cmd_generate  # its own module (file size)
from diffmem.cli._index import add_index_options
from diffmem.cli.args import (
    BATCH,
    COUNT,
    GENERATIONS,
    NONNEG,
    SEED,
    THRESHOLD,
    OutDir,
    OutFile,
    Parser,
    add_model,
    add_sampling,
)
from diffmem.runtime.errors import ConfigError, DiffmemError
from diffmem.runtime.interrupts import interrupted_message, kept, reset_kept
from diffmem.runtime.jsonio import dumps
from diffmem.runtime.logs import quiet_third_party
from diffmem.runtime.progress import enable_progress
from diffmem.runtime.version import __version__
from diffmem.testbed import require_spec

# ------------------------------------------------------------------------------------- commands


def _cmd_testbed_train(a: argparse.Namespace) -> int:
    if a.ddpm:  # the pixel testbed (diffmem.testbed.ddpm)
        return _ddpm.cmd_train(a)
    from diffmem.testbed.data import TestbedSpec
    from diffmem.testbed.train import (
        GRADED_SPEC,
        GRADED_TRAIN,
        TrainConfig,
        install_pipeline,
        train_testbed,
    )

    given = {"vae_steps": a.vae_steps, "unet_steps": a.unet_steps, "batch_size": a.batch_size}
    given = {k: v for k, v in given.items() if v is not None}
    rare = {} if a.rare_words is None else {"n_rare_words": a.rare_words}
    seed = {} if a.seed is None else {"seed": a.seed}
    if a.graded:
        cfg = TrainConfig(**{**GRADED_TRAIN, **given, **seed})
        spec = TestbedSpec(**{**GRADED_SPEC, **rare, **seed})
    else:
        cfg = TrainConfig(**{**given, **seed})
        spec = TestbedSpec(seed=cfg.seed, **rare)
    if a.continue_installed:  # the installed weights, trained for the default steps, go on
        from diffmem.testbed import testbed_path
        from diffmem.testbed.continue_run import seed_run_from_pipeline

        done = GRADED_TRAIN["unet_steps"] if a.graded else TrainConfig.unet_steps
        seed_run_from_pipeline(a.out, testbed_path("testbed-graded" if a.graded else "testbed"),
                               cfg, spec, done)
    kept(f"the training checkpoints in {a.out} (rerun the same command to resume)")
    target = train_testbed(a.out, cfg, spec)
    print(f"trained testbed pipeline: {target}")
    if a.install:
        print(f"installed into {install_pipeline(target)}")
    return 0


def _require_testbed_model(model: str | None, what: str) -> None:
    """Refuse a model that is no testbed at once (before loading it or generating anything); a
    named testbed (``testbed``, ``testbed-graded``) must be installed."""
    from diffmem.models.profile import named_model

    if model is None:
        return
    folder = named_model(model) or Path(model)  # a named model that is missing: one clear error
    if not (folder / "testbed.json").is_file():
        raise ConfigError(f"{what} needs a diffmem testbed model (a folder with testbed.json); "
                          f"{model} is not one")


def _cmd_testbed_verify(a: argparse.Namespace) -> int:
    from diffmem.testbed.verify import verify_testbed

    _require_testbed_model(a.model, "testbed verify")
    report = verify_testbed(a.model, out=a.out, seeds=a.seeds, steps=a.sampling_steps,
                            guidance_scale=a.guidance_scale, with_sscd=not a.no_sscd)
    summary = {k: v for k, v in report.items() if k != "prompts"}
    print(dumps(summary, indent=2))
    return 0


def _cmd_testbed_path(a: argparse.Namespace) -> int:
    from diffmem.testbed import testbed_path

    print(testbed_path("testbed-graded" if a.graded else "testbed"))
    return 0


def _cmd_testbed_prompts(a: argparse.Namespace) -> int:
    from diffmem.testbed import testbed_prompts
    from diffmem.testbed.data import write_prompts

    _require_testbed_model(a.model, "testbed prompts")
    if a.set == "broad":
        from diffmem.testbed import shipped_testbed_spec
        from diffmem.testbed.broad import write_broad_prompts

        spec = (shipped_testbed_spec() if a.model is None
                else require_spec(a.model, "testbed prompts"))  # its testbed.json: no loading
        path = write_broad_prompts(a.out, spec)
        print(f"wrote the broad prompt set (build fields; labels: `diffmem testbed label`) "
              f"to {path}")
        return 0
    path = write_prompts(testbed_prompts(a.model or "testbed"), a.out)
    print(f"wrote labelled prompts to {path}")
    return 0


def _cmd_testbed_label(a: argparse.Namespace) -> int:
    from diffmem.testbed.broad import label_broad_set

    _require_testbed_model(a.model, "testbed label")
    if a.install and (a.mitigate or a.group):
        raise ConfigError("testbed label --install makes plain labels of the whole set the "
                          "model's labels; drop --mitigate / --group, or give --out")
    out = a.out
    if out is None:
        if not a.install:
            raise ConfigError("testbed label needs --out FILE (or --install: the labels file "
                              "beside the model's weights)")
        from diffmem.testbed.install import labels_path

        out = labels_path(a.model)
    extra = {} if a.mitigate is None else {"mitigate": a.mitigate, "index": a.index}
    path = label_broad_set(out, a.model, seeds=a.seeds, steps=a.sampling_steps,
                           guidance_scale=a.guidance_scale, batch_size=a.batch_size,
                           groups=a.group, **extra)
    print(f"wrote generation labels to {path}")
    if a.install:
        from diffmem.testbed.install import install_labels

        profile = install_labels(a.model, path)
        print(f"installed them as the labels of {a.model} (profile: labels {profile.labels}, "
              f"{len(profile.clean_prompts)} clean prompts)")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from diffmem.demo import run_demo

    _require_testbed_model(a.model, "the demo")
    run_demo(a.model, a.out)
    return 0


# ------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="diffmem",
        description="Detect, explain, measure and mitigate memorization in diffusion models.")
    parser.add_argument("--version", action="version", version=f"diffmem {__version__}",
                        help="print the version and exit")
    parser.set_defaults(verbose=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="the main job on the testbed: detect, explain, measure")
    d.add_argument("--out", type=OutDir(), default="demo_out", help="output folder")
    add_model(d, testbed_only=True)
    d.set_defaults(func=_cmd_demo)

    g = sub.add_parser("generate", help="generate images (one per prompt; prompt i uses seed "
                                        "SEED+i)")
    g.add_argument("prompts", nargs="*",
                   help="one or more prompts (quote each). A pixel-space DDPM (a DDPMPipeline "
                        "folder, testbed-ddpm, testbed-ddpm-class) takes class labels instead: "
                        "'class:N' (N = 0.., or a class name its profile lists; '' = the null "
                        "class) or --class-label N; an unconditional one ignores prompts: give "
                        "--num-images N")
    g.add_argument("--class-label", type=int, action="append", default=None, metavar="N",
                   help="class-conditional DDPM: one image of class N (repeatable; same as the "
                        "prompt 'class:N')")
    g.add_argument("--num-images", type=COUNT, default=None, metavar="N",
                   help="unconditional DDPM: N images (N empty prompts; SEED+i for image i)")
    g.add_argument("--prompts-file", default=None, metavar="FILE",
                   help="more prompts: a text file (one per line) or a table (.csv, .jsonl, "
                        ".parquet; the 'prompt' or 'caption' column)")
    g.add_argument("--images-per-prompt", type=COUNT, default=None, metavar="N",
                   help="N images of every prompt, image j with seed SEED+j (default: one image "
                        "per prompt, prompt i with seed SEED+i)")
    g.add_argument("--out", type=OutDir(), default="generations",
                   help="output folder (NNNN.png and generations.jsonl)")
    g.add_argument("--seed", type=SEED, default=0,
                   help="prompt i uses generator seed SEED+i (with --images-per-prompt: image j of "
                        "every prompt uses SEED+j)")
    g.add_argument("--batch-size", type=BATCH, default=16,
                   help="prompts per batched run (each batch is written as soon as it is done)")
    add_model(g)
    add_sampling(g, deprecated_steps=True, model_guidance=True)
    g.add_argument("--detect", default=None, metavar="NAME",
                   help="also score each prompt with this detector ({detectors}), "
                        "with the detector's own settings: free within the run when the schedule "
                        "is the detector's (50 steps, guidance 7.5, the pipeline's scheduler), "
                        "else scored apart on the same initial noise; written to "
                        "generations.jsonl")
    g.add_argument("--mitigate", default=None, metavar="SPEC",
                   help="inference-time mitigation: NAME[:STRENGTH][,NAME...] of wen, ren, amg, rt, "
                        "rn, cwr, gni, delay, xt, reanchor, each applied to every prompt; 'auto' "
                        "is the closed-loop guard: watch every run, regenerate the prompts it "
                        "flags with mitigation, verify each image against --index and escalate "
                        "(auto,NAME: NAME first); verdicts in generations.jsonl; "
                        "see docs/mitigation.md")
    add_index_options(g, "training-set index folder: the guard (auto) verifies its images "
                         "against it; needed by amg and --detect preview_replication")
    g.add_argument("--threshold", type=THRESHOLD, default=None,
                   help="first-step noise-magnitude threshold of auto / wen (default: calibrated "
                        "on the testbed's held-out prompts, or stored by `diffmem calibrate`)")
    g.set_defaults(func=_cmd_generate)

    tb = sub.add_parser("testbed", help="the built-in testbed model").add_subparsers(
        dest="testbed_command", required=True, metavar="COMMAND")
    t = tb.add_parser("train", help="train the testbed pipeline (resumable)")
    t.add_argument("--out", type=OutDir(), required=True, help="run folder; rerun to resume")
    t.add_argument("--seed", type=SEED, default=None,
                   help="seed of the data and the training (default 0; with --graded 1)")
    t.add_argument("--graded", action="store_true",
                   help="train the second testbed, testbed-graded: items at graded duplicate "
                        "counts, its own vocabulary, 8 latent channels (docs/testbed.md)")
    # defaults (None) come from TrainConfig, the one place they are set
    t.add_argument("--vae-steps", type=NONNEG, help="VAE training steps (default: "
                                                     "TrainConfig.vae_steps)")
    t.add_argument("--unet-steps", type=NONNEG, help="UNet training steps (default: "
                                                      "TrainConfig.unet_steps)")
    t.add_argument("--batch-size", type=BATCH, help="training batch size (default: "
                                                     "TrainConfig.batch_size)")
    t.add_argument("--rare-words", type=NONNEG,
                   help="generic captions also carry words of a vocabulary of this size "
                        "(default: TestbedSpec.n_rare_words; 0: none)")
    t.add_argument("--continue-installed", action="store_true",
                   help="start from the installed weights (trained for the default steps) and "
                        "train the UNet on to --unet-steps, in a new --out folder (then resumable "
                        "as usual; the optimizer starts afresh)")
    t.add_argument("--install", action="store_true",
                   help="copy the trained pipeline into the package as the shipped testbed "
                        "(with --graded: as testbed-graded, into testbed/weights_graded)")
    t.add_argument("--ddpm", action="store_true",
                   help="train the pixel-space testbed instead: a small UNet2DModel (DDPMPipeline) "
                        "on 32x32 procedural images with 8 duplicated items, testbed-ddpm "
                        "(--unet-steps: its steps; docs/mitigation.md)")
    t.add_argument("--class-conditional", action="store_true",
                   help="with --ddpm: class-conditional (class = shape of the largest object, "
                        "plus a null class), testbed-ddpm-class")
    t.set_defaults(func=_cmd_testbed_train)
    _ddpm.register(tb)
    v = tb.add_parser("verify", help="measure replication rates of the testbed's prompts")
    v.add_argument("--out", type=OutFile(".json"), required=True, help="report JSON")
    v.add_argument("--seeds", type=GENERATIONS, default=4, help="images per prompt")
    v.add_argument("--no-sscd", action="store_true", help="skip the SSCD side metric")
    add_model(v, testbed_only=True)
    add_sampling(v, deprecated_steps=True)
    v.set_defaults(func=_cmd_testbed_verify)
    pth = tb.add_parser("path", help="print the shipped testbed pipeline folder")
    pth.add_argument("--graded", action="store_true",
                     help="the second testbed's folder (testbed-graded)")
    pth.set_defaults(func=_cmd_testbed_path)
    pr = tb.add_parser("prompts", help="write the labelled testbed prompts (JSONL)")
    pr.add_argument("--out", type=OutFile(".jsonl"), default="testbed_prompts.jsonl",
                    help="output JSONL")
    add_model(pr, testbed_only=True)
    pr.add_argument("--set", choices=("designed", "broad"), default="designed",
                    help="designed: the 92 prompts labelled by construction; broad: the "
                         "rule-built set that `diffmem testbed label` labels by generation")
    pr.set_defaults(func=_cmd_testbed_prompts)
    lb = tb.add_parser("label", help="label the broad prompt set by generation (resumable)")
    lb.add_argument("--out", default=None, help="labels JSONL; rerun to resume (the shipped "
                    "file is src/diffmem/testbed/broad_labels.jsonl; with --install the default "
                    "is broad_labels.jsonl in the model's folder)")
    lb.add_argument("--install", action="store_true",
                    help="then make them the model's labels: its profile points to the file and "
                         "takes their copy-free clean controls as its clean prompts")
    lb.add_argument("--seeds", type=int, default=4, help="generations per prompt")
    lb.add_argument("--batch-size", type=int, default=32, help="images per batched run")
    lb.add_argument("--group", action="append", default=None,
                    help="only the prompts of this group (repeatable; e.g. caption)")
    lb.add_argument("--mitigate", default=None, metavar="SPEC",
                    help="label the images served under this mitigation (as `generate "
                         "--mitigate`: auto is the guard), e.g. for the dose-response lines "
                         "of `diffmem eval dose`")
    lb.add_argument("--index", default=None, metavar="IDX",
                    help="training-set index folder for --mitigate (the guard verifies against "
                         "it; amg needs it)")
    add_model(lb, testbed_only=True)
    add_sampling(lb)
    lb.set_defaults(func=_cmd_testbed_label)

    ev = sub.add_parser("eval", help="evaluate a method on labelled data").add_subparsers(
        dest="eval_command", required=True, metavar="COMMAND")
    for module in _EXTENSIONS:
        _load_extension(module).register(sub, ev)
    return parser


def _load_extension(name: str):
    """The command-line module ``name`` (e.g. ``diffmem.cli.detect``). These modules import only
    :mod:`diffmem.cli.args` and :mod:`diffmem.runtime` at top level, so parsing, ``--help`` and a
    bad option answer before torch is imported."""
    return importlib.import_module(name)


#: Modules with a ``register(commands, eval_commands)`` function adding their subcommands (one module
#: per command group, with the shared option types of :mod:`diffmem.cli.args`).
_EXTENSIONS: list[str] = [
    "diffmem.cli.detect",
    "diffmem.cli.calibrate",
    "diffmem.cli.explain",
    "diffmem.cli.eval",
    "diffmem.cli.similarity",
    "diffmem.cli.mitigate",
    "diffmem.cli.scale",
    "diffmem.cli.train",
    "diffmem.cli.recovery",
    "diffmem.cli.server",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Bad input: one line on stderr, exit code 2; Ctrl-C: one line saying what
    was kept, exit code 130; never a traceback for either."""
    reset_kept()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a bad option (one line printed, code 2) or --help / --version (0)
        return e.code if isinstance(e.code, int) else 2
    saved = warnings.showwarning
    with warnings.catch_warnings():
        quiet_third_party(args.verbose)
        enable_progress(True)
        try:
            return int(args.func(args) or 0)
        except DiffmemError as e:
            print(f"diffmem: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        except FileNotFoundError as e:
            print(f"diffmem: error: {e.filename or e}: file not found", file=sys.stderr)
            return 2
        except PermissionError as e:
            print(f"diffmem: error: {e.filename or e}: permission denied", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            # a second Ctrl-C while threads wind down would print a traceback from threading
            with contextlib.suppress(ValueError):  # not in the main thread
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            print(interrupted_message(), file=sys.stderr)
            return 130
        finally:
            enable_progress(False)
            warnings.showwarning = saved


def run() -> None:
    """The console entry point (``diffmem``, ``python -m diffmem.cli``): :func:`main`, then the
    process ends without tearing the interpreter down. Freeing torch's and diffusers' module
    state at exit costs about 1 s of CPU per command (measured: bench/RESULTS.md) and, after a
    Ctrl-C, could print a traceback from a winding-down thread. Every file a command writes is
    closed before :func:`main` returns; the standard streams and logging are flushed here."""
    import logging
    import os

    rc = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(rc)



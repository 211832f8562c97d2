"""Command-line parsing of the detection commands; each calls one library function.

    diffmem detect PROMPTS_FILE --out FILE [--column C] [--model M] [--detector NAME]
                   [--steps N|all] [--generations G] [--threshold-from CLEAN_FILE]
    diffmem eval detection --detector NAME --steps N|all --generations G --out report.json
                   [--prompts LABELLED_FILE] [--model M]

``diffmem generate ... --detect NAME`` is the generate command's own option (hooks from names:
:func:`diffmem.generate.build_hooks`).
"""

from __future__ import annotations

import argparse

from diffmem.cli._index import add_index_options, command_index
from diffmem.cli.args import (
    BATCH,
    FPR,
    GENERATIONS,
    SEED,
    STEPS_HELP,
    TABLE_SUFFIXES,
    OutFile,
    add_model,
    add_sampling,
    scored_steps,
)
from diffmem.runtime.defaults import DEFAULT_DETECTOR, DEFAULT_INDEX_DETECTOR
from diffmem.runtime.jsonio import dumps


def _cmd_detect(a: argparse.Namespace) -> int:
    from diffmem.detect.registry import DETECTORS
    from diffmem.detect.scan import detect_file

    choice, model = None, a.model
    if a.detector is None or DETECTORS.get(a.detector)[0].needs_index:
        # --index, else the index `diffmem calibrate --index` stored (default detector then:
        # preview_replication)
        choice, model = command_index(a, a.model, scheduler=a.scheduler)
        a.index = choice.index
    summary = detect_file(a.prompts_file, a.out, model=model, detector=a.detector,
                          steps=a.steps, generations=a.generations,
                          threshold_from=a.threshold_from, fpr=a.fpr,
                          num_inference_steps=a.sampling_steps, guidance_scale=a.guidance_scale,
                          scheduler=a.scheduler, batch_size=a.batch_size, seed=a.seed,
                          seed_mode=a.seed_mode, column=a.column, index=a.index)
    if choice is not None and choice.index is not None:
        summary["index"] = choice.describe()
    print(dumps(summary, indent=2))
    return 0


def _cmd_eval_detection(a: argparse.Namespace) -> int:
    from diffmem.eval.detection import evaluate_detection

    report = evaluate_detection(a.detector, model=a.model, prompts=a.prompts, out=a.out,
                                steps=a.steps, generations=a.generations,
                                num_inference_steps=a.sampling_steps,
                                guidance_scale=a.guidance_scale, scheduler=a.scheduler,
                                batch_size=a.batch_size, seed=a.seed, fpr=a.fpr, split=a.split,
                                seed_mode=a.seed_mode, index=a.index)
    print(dumps(report, indent=2))
    return 0


INDEX_HELP = ("the training set's index (`diffmem index build`): enables "
              f"{DEFAULT_INDEX_DETECTOR}, which generates short previews and searches them for "
              "copies, and makes it the default")


def _add_detector_options(p: argparse.ArgumentParser, *, stored_index: bool = False) -> None:
    p.add_argument("--detector", default=None,
                   help=f"one of: {{detectors}} (default {DEFAULT_DETECTOR}, 1 step, 4 "
                        f"generations; with --index {DEFAULT_INDEX_DETECTOR}, 4 previews of 20 "
                        "steps; the one-step option: noise_magnitude)")
    if stored_index:  # detect: --index, else the index `diffmem calibrate --index` stored
        add_index_options(p, INDEX_HELP)
    else:
        p.add_argument("--index", default=None, metavar="IDX", help=INDEX_HELP)
    p.add_argument("--steps", type=scored_steps, default=None,
                   help=STEPS_HELP + " (default: the detector's own, 1 or last:10)")
    p.add_argument("--generations", type=GENERATIONS, default=None,
                   help="initial noises per prompt, scores averaged (default: the detector's own, "
                        f"4 for sharpness and {DEFAULT_INDEX_DETECTOR} (its maximum), 1 for the "
                        "others)")
    add_model(p)
    add_sampling(p, steps_default=None,
                 steps_help=f" (default: the detector's own, 50; 20 for {DEFAULT_INDEX_DETECTOR})")
    p.add_argument("--batch-size", type=BATCH, default=16,
                   help="images per batched UNet call")
    p.add_argument("--seed", type=SEED, default=0, help="first generator seed (see --seed-mode)")
    p.add_argument("--seed-mode", choices=("per-generation", "per-prompt"),
                   default="per-generation",
                   help="per-generation: generation g of every prompt uses seed SEED+g (all "
                        "prompts share noises); per-prompt: prompt i uses seed SEED+i, the "
                        "convention of Wen et al.'s reference detect_mem.py")


def register(commands: argparse._SubParsersAction, eval_commands: argparse._SubParsersAction
             ) -> None:
    """Add ``detect`` and ``eval detection``."""
    d = commands.add_parser("detect", help="score prompts for memorization (higher = memorized)")
    d.add_argument("prompts_file", help="prompts: .txt (one per line), .csv/.tsv (a column), "
                                        ".jsonl or .parquet (a field)")
    d.add_argument("--out", type=OutFile(*TABLE_SUFFIXES), required=True,
                   help="per-prompt scores (prompt, score, truncated[, flagged]); the format "
                        "follows the suffix: .csv, .jsonl or .parquet")
    d.add_argument("--column", default=None,
                   help="column (.csv/.tsv/.parquet) or field (.jsonl) holding the prompts "
                        "(default: 'prompt' or 'caption')")
    d.add_argument("--threshold-from", default=None,
                   help="clean prompts to calibrate a threshold on; adds a 'flagged' column (without "
                        "it, so does a threshold `diffmem calibrate` stored for these settings)")
    d.add_argument("--fpr", type=FPR, default=0.01,
                   help="target false-positive rate of --threshold-from, in (0, 1)")
    _add_detector_options(d, stored_index=True)
    d.set_defaults(func=_cmd_detect)

    e = eval_commands.add_parser("detection", help="AUC / TPR@FPR of a detector on labelled "
                                                   "prompts (default: the testbed's)")
    e.add_argument("--out", type=OutFile(".json"), required=True,
                   help="report JSON (ROC PNG and scores CSV beside it)")
    e.add_argument("--prompts", default=None,
                   help="'broad' (the testbed's prompts labelled by generation; the default for "
                        "the shipped testbed), 'designed' (the 92 prompts labelled by "
                        "construction) or a labelled .jsonl/.parquet")
    e.add_argument("--fpr", type=float, default=0.01,
                   help="FPR of the threshold calibrated on the clean controls (default 0.01)")
    e.add_argument("--split", default=None, choices=("dev", "test"),
                   help="only the prompts of this split of the broad set")
    _add_detector_options(e)
    e.set_defaults(func=_cmd_eval_detection)

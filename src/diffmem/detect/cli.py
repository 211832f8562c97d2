"""Command-line parsing of the detection commands; each calls one library function.

    diffmem detect PROMPTS_FILE --out FILE [--model M] [--detector NAME] [--steps N|all]
                   [--generations G] [--threshold-from CLEAN_FILE]
    diffmem eval detection --detector NAME --steps N|all --generations G --out report.json
                   [--prompts LABELLED_FILE] [--model M]

``diffmem generate ... --detect NAME`` is the generate command's own option (hooks from names:
:func:`diffmem.generate.build_hooks`).
"""

from __future__ import annotations

import argparse
import json

from diffmem.detect.registry import DEFAULT_DETECTOR, DETECTORS


def _cmd_detect(a: argparse.Namespace) -> int:
    from diffmem.detect.scan import detect_file

    summary = detect_file(a.prompts_file, a.out, model=a.model, detector=a.detector,
                          steps=a.steps, generations=a.generations,
                          threshold_from=a.threshold_from, fpr=a.fpr,
                          num_inference_steps=a.sampling_steps, guidance_scale=a.guidance_scale,
                          scheduler=a.scheduler, batch_size=a.batch_size, seed=a.seed)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_eval_detection(a: argparse.Namespace) -> int:
    from diffmem.eval.detection import evaluate_detection

    report = evaluate_detection(a.detector, model=a.model, prompts=a.prompts, out=a.out,
                                steps=a.steps, generations=a.generations,
                                num_inference_steps=a.sampling_steps,
                                guidance_scale=a.guidance_scale, scheduler=a.scheduler,
                                batch_size=a.batch_size, seed=a.seed, fpr=a.fpr, split=a.split)
    print(json.dumps(report, indent=2))
    return 0


def _add_detector_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--detector", default=DEFAULT_DETECTOR,
                   help=f"one of: {', '.join(DETECTORS)} (default {DEFAULT_DETECTOR}, 1 step, 4 "
                        "generations; the one-step option: noise_magnitude)")
    p.add_argument("--steps", default=None,
                   help="denoising steps scored: N (the first N), last:N, all, or indices "
                        "'0,5,9' (default: the detector's own, 1 or last:10)")
    p.add_argument("--generations", type=int, default=None,
                   help="initial noises per prompt (default: the detector's own, 4 for "
                        "sharpness, 1 for the others)")
    p.add_argument("--model", default="testbed",
                   help="pipeline folder (SD 1.x/2.x) or 'testbed' (default)")
    p.add_argument("--sampling-steps", type=int, default=50,
                   help="length of the denoising schedule (default 50)")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--scheduler", default=None, help="ddim, dpm, euler, euler_a, pndm, ...")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="generation g uses seed SEED+g")


def register(commands: argparse._SubParsersAction, eval_commands: argparse._SubParsersAction
             ) -> None:
    """Add ``detect`` and ``eval detection``."""
    d = commands.add_parser("detect", help="score prompts for memorization (higher = memorized)")
    d.add_argument("prompts_file", help="prompts: .txt (one per line), .jsonl or .parquet")
    d.add_argument("--out", required=True, help="per-prompt scores: .csv, .parquet or .jsonl")
    d.add_argument("--threshold-from", default=None,
                   help="clean prompts to calibrate a threshold on; adds a 'flagged' column")
    d.add_argument("--fpr", type=float, default=0.01, help="target FPR of --threshold-from")
    _add_detector_options(d)
    d.set_defaults(func=_cmd_detect)

    e = eval_commands.add_parser("detection", help="AUC / TPR@FPR of a detector on labelled "
                                                   "prompts (default: the testbed's)")
    e.add_argument("--out", required=True, help="report JSON (ROC PNG and scores CSV beside it)")
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

"""``diffmem calibrate``: parsing and printing only; the work is
:func:`diffmem.detect.calibration.calibrate_model`.

    diffmem calibrate --model PATH [--clean FILE] [--column C] [--fpr F] [--index DIR]

Stores, keyed by the fingerprint of the model's weights, the first-step noise-magnitude threshold
(the gate of ``generate --mitigate auto`` / ``wen``, ``serve``, the guard's watch) and the threshold
of ``detect``'s default detector, so that ``generate``, ``detect``, ``explain``, ``serve`` and
``scan`` need no ``--threshold``. With ``--index DIR`` (checked against the model first) it also
records the training index for these weights: those commands then decide by generation without
``--index`` (``--no-index``: not for one command). Prints one JSON summary.
"""

from __future__ import annotations

import argparse

from diffmem.cli.args import FPR, add_model
from diffmem.runtime.jsonio import dumps

#: the roles of the first-step noise-magnitude threshold (one calibration serves them all)
FIRST_STEP_ROLES = ("first_step", "watch")
_SOURCES = {"profile": "the model profile's clean prompts",
            "shipped": "the shipped ordinary prompts (diffmem/detect/clean_prompts.txt)"}


def cmd_calibrate(a: argparse.Namespace) -> int:
    from diffmem.detect.calibration import calibrate_model
    from diffmem.detect.prompts import read_prompts
    from diffmem.models.calibration import CalibrationStore

    clean = read_prompts(a.clean, a.column) if a.clean is not None else None  # before the model
    store = CalibrationStore()
    cals = calibrate_model(a.model, clean, fpr=a.fpr, store=store, index=a.index)
    thresholds: dict = {}
    for cal in cals:
        if cal.detector == "noise_magnitude":
            thresholds.update({role: cal.threshold for role in FIRST_STEP_ROLES})
        else:
            thresholds[cal.detector] = cal.threshold
    summary = {
        "model": str(a.model), "fingerprint": cals[0].model, "fpr": a.fpr,
        "n_clean": cals[0].n_clean,
        "clean_prompts": a.clean or _SOURCES[cals[0].extra["clean"]],
        "thresholds": thresholds,
        "detectors": {cal.detector: cal.settings for cal in cals},
        "stored": [str(store.folder / f"{cal.key}.json") for cal in cals],
    }
    if a.index is not None:
        found = store.get_index(cals[0].model)
        summary["index"] = {"path": found.path, "stored": found.record}
    print(dumps(summary, indent=2))
    return 0


def register(commands, eval_commands) -> None:
    """Add ``calibrate``."""
    c = commands.add_parser("calibrate", help="calibrate a model's thresholds once (stored by its "
                                              "weights' fingerprint; later commands need no "
                                              "--threshold)")
    add_model(c)
    c.add_argument("--clean", default=None, metavar="FILE",
                   help="known-clean prompts (.txt one per line, .csv/.jsonl/.parquet by column; "
                        "default: the model's own clean prompts, e.g. the testbed's held-out ones, "
                        "else the shipped list of ~200 ordinary prompts)")
    c.add_argument("--column", default=None,
                   help="column or field of --clean holding the prompts (default: 'prompt' or "
                        "'caption')")
    c.add_argument("--fpr", type=FPR, default=0.01,
                   help="target false-positive rate on the clean prompts, in (0, 1)")
    c.add_argument("--index", default=None, metavar="DIR",
                   help="the model's training index (`diffmem index build`), checked against the "
                        "model and stored with the calibration: explain, detect, generate "
                        "--mitigate auto, serve and scan then decide by generation without --index "
                        "(--no-index: not for one command)")
    c.set_defaults(func=cmd_calibrate)

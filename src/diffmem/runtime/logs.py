"""Quiet third-party libraries: one line per diffmem warning, no transformers/diffusers noise."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def quiet_third_party(verbose: bool) -> None:
    """Unless ``verbose``: silence transformers/diffusers log messages and loading bars and every
    warning not raised by diffmem; diffmem's own warnings print as one line without source.

    Set through environment variables before those libraries are imported (importing them here
    would cost start-up time)."""
    import warnings

    if verbose:
        warnings.simplefilter("default")
        return
    for var, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                       ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        os.environ.setdefault(var, value)
    for name in ("transformers", "diffusers"):  # already imported (e.g. in tests): quiet them too
        mod = sys.modules.get(f"{name}.utils.logging")
        if mod is not None:
            mod.set_verbosity_error()
            mod.disable_progress_bar()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if _from_diffmem(filename):
            print(f"diffmem: warning: {message}", file=file or sys.stderr)

    warnings.showwarning = show
    warnings.simplefilter("default")


def _from_diffmem(filename: str) -> bool:
    root = str(Path(__file__).resolve().parent.parent)
    try:
        return str(Path(filename).resolve()).startswith(root)
    except OSError:
        return False



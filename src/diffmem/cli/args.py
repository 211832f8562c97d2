"""What every ``diffmem`` command's parser shares: option types that check values before any work,
help with defaults, output paths checked up front.

Nothing here imports torch, diffusers or transformers: ``diffmem --help`` and a bad option answer at
once.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from diffmem.runtime.defaults import SAMPLING
from diffmem.runtime.errors import ConfigError

# ------------------------------------------------------------------------------------- parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``ArgumentDefaultsHelpFormatter`` that shows a default only where there is one to show
    (not for ``None``, flags or positionals)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "{detectors}" in text:  # filled only when help is printed: the registry imports torch
            from diffmem.detect.registry import DETECTORS

            text = text.replace("{detectors}", ", ".join(DETECTORS))
        if ("%(default)" in text or action.default in (None, False, argparse.SUPPRESS)
                or not action.option_strings or isinstance(action.default, bool)):
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """The parser class of every diffmem (sub)command: defaults shown in ``--help``, a bad value
    answered with ONE line (``diffmem generate: error: argument --steps: ...``) and exit code 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        if kwargs.get("add_help", True):
            # accepted before or after the subcommand; SUPPRESS keeps a subcommand from resetting it
            self.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                              help="show third-party warnings and loading messages")

    def error(self, message: str) -> None:  # type: ignore[override]
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


class Number:
    """An argparse ``type`` for a number with a range: rejects non-numbers, NaN/inf and values out
    of range at parse time; warns (one line on stderr) above ``warn_above``."""

    def __init__(self, kind: type = int, *, min: float | None = None, max: float | None = None,
                 min_open: bool = False, max_open: bool = False, warn_above: float | None = None,
                 warn: str = "a very long run; Ctrl-C stops it") -> None:
        self.kind, self.min, self.max = kind, min, max
        self.min_open, self.max_open = min_open, max_open
        self.warn_above, self.warn = warn_above, warn
        self.__name__ = "integer" if kind is int else "number"

    def describe(self) -> str:
        lo = "" if self.min is None else f"{'>' if self.min_open else '>='} {self.min:g}"
        hi = "" if self.max is None else f"{'<' if self.max_open else '<='} {self.max:g}"
        if lo and hi:
            return f"{'an integer' if self.kind is int else 'a number'} {lo} and {hi}"
        return f"{'an integer' if self.kind is int else 'a finite number'} {lo or hi}".strip()

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r} "
                                             "(not a finite number)")
        bad_lo = self.min is not None and (value <= self.min if self.min_open else value < self.min)
        bad_hi = self.max is not None and (value >= self.max if self.max_open else value > self.max)
        if bad_lo or bad_hi:
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}")
        if self.warn_above is not None and value > self.warn_above:
            print(f"diffmem: warning: {text} is {self.warn}", file=sys.stderr)
        return value


#: The numeric options of every command, one definition each (so one meaning and one range).
SEED = Number(int, min=0, max=2**63 - 1)
SAMPLING_STEPS = Number(int, min=1, max=10_000, warn_above=1000,
                        warn="more than 1000 sampling steps: a very long run; Ctrl-C stops it")
GUIDANCE = Number(float, min=0, max=1000, warn_above=50,
                  warn="an unusually high guidance scale (SD uses 5-10)")
BATCH = Number(int, min=1, max=100_000, warn_above=1024,
               warn="a very large batch; it may run out of memory")
GENERATIONS = Number(int, min=1, max=1_000_000, warn_above=64,
                     warn="many generations per prompt: a very long run (cost grows linearly); "
                          "Ctrl-C stops it")
COUNT = Number(int, min=1)
LOWPASS = Number(int, min=8, max=4096)
NONNEG = Number(int, min=0)
FPR = Number(float, min=0, max=1, min_open=True, max_open=True)
THRESHOLD = Number(float)
STRENGTH = Number(float, min=0, max=1000)
UNIT = Number(float, min=0, max=1)


def scored_steps(text: str):
    """argparse type of ``--steps`` (the denoising steps a method scores or attributes):
    ``N``, ``first:N``, ``last:N``, ``all`` or indices ``0,5,9`` (:mod:`diffmem.core.steps`)."""
    from diffmem.core.steps import parse_steps

    try:
        return parse_steps(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


STEPS_HELP = ("denoising steps scored: N (the first N), first:N, last:N, all, or indices '0,5,9' "
              "(the same meaning in every command; the schedule length is --sampling-steps)")


class DeprecatedAlias(argparse.Action):
    """An old option spelling that still works and says, once, which option replaces it."""

    def __init__(self, option_strings, dest, *, new: str, **kwargs: Any) -> None:
        self.new = new
        kwargs.setdefault("help", f"deprecated spelling of {new}")
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"diffmem: warning: {option_string} is deprecated here; use {self.new} (the same "
              "value)", file=sys.stderr)
        setattr(namespace, self.dest, values)


MODEL_HELP = ("diffusers pipeline folder (SD 1.x, SD 2.x, SDXL, or a pixel-space DDPMPipeline), or "
              "a shipped testbed model: 'testbed', 'testbed-graded', 'testbed-ddpm' or "
              "'testbed-ddpm-class'")
TESTBED_MODEL_HELP = ("a diffmem testbed model folder, 'testbed' or 'testbed-graded' (pixel "
                      "testbed: 'testbed-ddpm', 'testbed-ddpm-class')")


def add_model(p: argparse.ArgumentParser, *, testbed_only: bool = False) -> None:
    """``--model``: the same option, default and help in every command that loads a model."""
    p.add_argument("--model", default="testbed",
                   help=TESTBED_MODEL_HELP if testbed_only
                   else MODEL_HELP)


def add_sampling(p: argparse.ArgumentParser, *, deprecated_steps: bool = False,
                 steps_default: int | None = SAMPLING.steps, steps_help: str = "",
                 model_guidance: bool = False) -> None:
    """``--sampling-steps``, ``--guidance-scale``, ``--scheduler``: the sampling settings."""
    p.add_argument("--sampling-steps", type=SAMPLING_STEPS, default=steps_default,
                   help="length of the denoising schedule" + steps_help)
    if deprecated_steps:  # the old spelling of generate / testbed verify
        p.add_argument("--steps", dest="sampling_steps", type=SAMPLING_STEPS,
                       action=DeprecatedAlias, new="--sampling-steps", help=argparse.SUPPRESS,
                       default=argparse.SUPPRESS)
    if model_guidance:  # default the model's: 7.5, or 1 for a pixel-space DDPM
        p.add_argument("--guidance-scale", type=GUIDANCE, default=None,
                       help=f"classifier-free guidance scale (finite, >= 0; default "
                            f"{SAMPLING.guidance_scale:g}; a pixel-space DDPM: 1, plain sampling, "
                            "and above 1 classifier-free guidance over the class label with the "
                            "null class)")
    else:
        p.add_argument("--guidance-scale", type=GUIDANCE, default=SAMPLING.guidance_scale,
                       help="classifier-free guidance scale (finite, >= 0)")
    p.add_argument("--scheduler", default=None,
                   help="sampler: ddim, pndm, ddpm, euler, euler_a, dpm, unipc, lms or a diffusers "
                        "scheduler class name (default: the pipeline's own)")


# ------------------------------------------------------------------------------------- paths


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _writable_below(path: Path, what: str) -> None:
    anc = _nearest_existing(path.parent if path.parent != Path("") else Path("."))
    if not anc.is_dir():
        raise argparse.ArgumentTypeError(f"{what} {str(path)!r}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{what} {str(path)!r}: cannot write in {anc} "
                                         "(permission denied)")


class OutFile:
    """argparse ``type`` of an output file: its folder must be creatable and writable, the path no
    folder, and its suffix one of ``suffixes`` (None: any) -- all checked before any work."""

    def __init__(self, *suffixes: str) -> None:
        self.suffixes = tuple(suffixes)
        self.__name__ = "output file"

    def __call__(self, text: str) -> str:
        path = Path(text)
        if not text.strip():
            raise argparse.ArgumentTypeError("empty output path")
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name")
        if self.suffixes and path.suffix.lower() not in self.suffixes:
            raise argparse.ArgumentTypeError(
                f"{text!r}: unsupported output format {path.suffix or '(no suffix)'!r}; use "
                + ", ".join(self.suffixes))
        if path.exists() and not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text!r}: file is not writable (permission denied)")
        _writable_below(path, "output file")
        return text


class OutDir:
    """argparse ``type`` of an output folder: not an existing file, creatable and writable."""

    __name__ = "output folder"

    def __call__(self, text: str) -> str:
        path = Path(text)
        if not text.strip():
            raise argparse.ArgumentTypeError("empty output path")
        if path.exists() and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is an existing file, not a folder")
        if path.is_dir():
            if not os.access(path, os.W_OK | os.X_OK):
                raise argparse.ArgumentTypeError(f"{text!r}: folder is not writable "
                                                 "(permission denied)")
            return text
        _writable_below(path / "x", "output folder")
        return text


TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")


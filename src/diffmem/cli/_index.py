"""``--index`` / ``--no-index`` of the commands that decide by generation (``explain``, ``detect``,
``generate``, ``serve``, ``scan``): the options, and the index a command uses
(:func:`diffmem.models.calibration.choose_index`: the given one, else the one ``diffmem calibrate
--index`` stored for the model's weights), with the one line saying so.

Nothing here imports torch at module level (parsing stays fast).
"""

from __future__ import annotations

import argparse
import sys

STORED_HELP = (" (default: the index `diffmem calibrate --index` stored for the model's weights, "
               "if any)")


def add_index_options(p, help_text: str) -> None:
    """``--index IDX`` (``help_text`` + where the default comes from) and ``--no-index``, which
    exclude each other; ``p`` is a parser or an argument group."""
    both = p.add_mutually_exclusive_group()
    both.add_argument("--index", default=None, metavar="IDX", help=help_text + STORED_HELP)
    both.add_argument("--no-index", action="store_true",
                      help="do not use the training index stored by `diffmem calibrate --index` "
                           "(this command only)")


def command_index(a: argparse.Namespace, model, *, scheduler: str | None = None):
    """``(choice, model)``: the :class:`~diffmem.models.calibration.IndexChoice` of the command
    (``choice.index``: ``a.index``, else the stored one unless ``a.no_index``) and the model:
    loaded as an adapter when its weights had to be fingerprinted (pass it on, so that it is not
    loaded twice), else ``model`` as given. Prints one line on stderr when the stored index is
    used."""
    from diffmem.models.calibration import choose_index

    loaded = []

    def load():
        from diffmem.models.adapter import load_adapter

        loaded.append(load_adapter(model, scheduler=scheduler))
        return loaded[0]

    choice = choose_index(a.index, load=load, use_stored=not getattr(a, "no_index", False))
    note = choice.note()
    if note:
        print(f"diffmem: {note}", file=sys.stderr, flush=True)
    return choice, (loaded[0] if loaded else model)

"""One progress bar per long job: silent in library calls unless the command line enabled bars.

Library functions take their bar from :func:`progress` (a context manager yielding an object with
``update(n)``); a job inside another job's bar gets a silent one.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any

_state = threading.local()
_enabled = False


def enable_progress(on: bool = True) -> None:
    """Show progress bars (the command line turns them on; library calls stay silent)."""
    global _enabled
    _enabled = on


@contextlib.contextmanager
def progress(total: int | None, desc: str, unit: str = "it") -> Iterator[Any]:
    """ONE progress bar (tqdm: count, rate, ETA) for a long job; a job inside another job's bar
    gets a silent one, so a command shows one bar per long job. Yields an object with
    ``update(n)``."""
    depth = getattr(_state, "depth", 0)
    if not _show_bars() or depth > 0:
        _state.depth = depth + 1
        try:
            yield _Silent()
        finally:
            _state.depth = depth
        return
    from tqdm.auto import tqdm

    _state.depth = depth + 1
    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
               leave=True, mininterval=0.5)
    try:
        yield bar
    finally:
        bar.close()
        _state.depth = depth


@contextlib.contextmanager
def silent_progress() -> Iterator[None]:
    """Inside, every :func:`progress` bar is silent: for work that runs under a bar of its own
    (e.g. the caption screen's detector runs inside ``diffmem train``'s training bar)."""
    depth = getattr(_state, "depth", 0)
    _state.depth = depth + 1
    try:
        yield
    finally:
        _state.depth = depth


def _show_bars() -> bool:
    """Bars on a terminal when the command line enabled them; ``DIFFMEM_PROGRESS=1`` forces them
    (e.g. into a log file), ``=0`` hides them."""
    forced = os.environ.get("DIFFMEM_PROGRESS")
    if forced is not None:
        return forced not in ("", "0")
    return _enabled and bool(getattr(sys.stderr, "isatty", None) and sys.stderr.isatty())


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass


def track(iterable: Iterable, total: int | None, desc: str, unit: str = "it") -> Iterator:
    """Iterate with :func:`progress`."""
    with progress(total, desc, unit) as bar:
        for item in iterable:
            yield item
            bar.update(1)



"""What a command has finished and left on disk, said in one line after Ctrl-C."""

from __future__ import annotations

_kept: dict[str, str] = {}


def kept(what: str, key: str | None = None) -> None:
    """Record something a command has finished and left on disk (said after a Ctrl-C); a later
    record with the same ``key`` replaces the earlier one (e.g. a growing count of images)."""
    _kept.pop(key or what, None)
    _kept[key or what] = what


def reset_kept() -> None:
    _kept.clear()


def interrupted_message() -> str:
    """The one line printed after Ctrl-C: what was kept, or that nothing was."""
    if not _kept:
        return "diffmem: interrupted; nothing was written"
    items = list(_kept.values())
    shown = "; ".join(items[-3:])
    more = f" (and {len(items) - 3} earlier)" if len(items) > 3 else ""
    return f"diffmem: interrupted; kept {shown}{more}"

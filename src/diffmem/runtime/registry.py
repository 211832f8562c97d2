"""One registry style for everything chosen by name: detectors, mitigations, schedulers, models.

A :class:`Registry` maps names to entries with one spelling rule (:func:`registry_name`:
``noise-magnitude`` = ``Noise_Magnitude`` = ``noise_magnitude``) and one error for an unknown name.
An entry given as ``"package.module:attribute"`` is imported on first lookup, so that a registry
can list what it holds without importing torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

from diffmem.runtime.errors import ConfigError
from diffmem.runtime.naming import registry_name

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Name -> entry. ``what`` names the kind in errors ("unknown detector 'magic'; choose one
    of: ...")."""

    def __init__(self, what: str, entries: Mapping[str, T | str] | None = None) -> None:
        self.what = what
        self._entries: dict[str, T | str] = {}
        for name, entry in (entries or {}).items():
            self.register(name, entry)

    def register(self, name: str, entry: T | str) -> None:
        """Add (or replace) an entry; a ``"module:attribute"`` string is imported on lookup."""
        self._entries[registry_name(name)] = entry

    def get(self, name: str, default: object = ConfigError) -> T:  # type: ignore[override]
        """The entry of ``name``; an unknown name raises one :class:`ConfigError` listing the
        choices (or returns ``default`` when one is given)."""
        key = registry_name(name)
        if key not in self._entries:
            if default is not ConfigError:
                return default  # type: ignore[return-value]
            raise ConfigError(f"unknown {self.what} {name!r}; choose one of: {', '.join(self)}")
        entry = self._entries[key]
        if isinstance(entry, str) and ":" in entry:
            module, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module), attr)
            self._entries[key] = entry
        return entry  # type: ignore[return-value]

    def __getitem__(self, name: str) -> T:
        if registry_name(name) not in self._entries:
            raise KeyError(name)
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and registry_name(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {list(self._entries)})"

"""Names of registry entries (detectors, schedulers, mitigations): one spelling rule for all.

Users write ``noise-magnitude`` or ``noise_magnitude``, ``euler-a`` or ``Euler_A``; registries store
the lowercase underscore form, and every lookup goes through :func:`registry_name`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from diffmem.runtime.errors import ConfigError

T = TypeVar("T")


def registry_name(name: str) -> str:
    """The registry key of ``name``: surrounding spaces dropped, lowercase, ``-`` -> ``_``."""
    return name.strip().lower().replace("-", "_")


def lookup(registry: Mapping[str, T], name: str, what: str) -> T:
    """``registry[registry_name(name)]``, or one :class:`ConfigError` naming ``what`` and the
    choices (e.g. ``unknown detector 'magic'; choose one of: noise_magnitude, ...``)."""
    key = registry_name(name)
    if key not in registry:
        raise ConfigError(f"unknown {what} {name!r}; choose one of: {', '.join(registry)}")
    return registry[key]

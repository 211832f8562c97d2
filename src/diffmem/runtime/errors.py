"""Exceptions diffmem raises for bad input: one clear message each, never a traceback dump."""

from __future__ import annotations


class DiffmemError(Exception):
    """Base class for every error diffmem reports to users."""


class ModelLoadError(DiffmemError):
    """A model folder or weight file is missing, corrupt or of an unsupported kind."""


class PromptError(DiffmemError):
    """A prompt list is empty, unreadable or otherwise unusable."""


class ConfigError(DiffmemError):
    """An option has an invalid value (unknown scheduler, detector name, ...)."""


class EmptyInputError(DiffmemError):
    """An input that must hold data (an image folder, a prompt file, a table) holds none."""

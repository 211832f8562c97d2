"""The testbed: a small Stable-Diffusion-format model diffmem trains on procedural data with known
memorized prompts. ``testbed_path()`` is the shipped pipeline folder (``testbed_path("testbed-graded")``
the second testbed's), ``shipped_testbed_spec()`` the data it was trained on
(:mod:`diffmem.testbed.locate`)."""

from __future__ import annotations

from diffmem.testbed.locate import (
    GRADED_WEIGHTS_DIR,
    REPLICATION_THRESHOLD,
    WEIGHTS_DIR,
    labelled_prompts,
    labels_of,
    require_spec,
    shipped_testbed_spec,
    spec_of,
    testbed_path,
    testbed_prompts,
    testbed_spec_of,
    write_labelled_prompts,
)

__all__ = [
    "GRADED_WEIGHTS_DIR",
    "REPLICATION_THRESHOLD",
    "WEIGHTS_DIR",
    "labelled_prompts",
    "labels_of",
    "require_spec",
    "shipped_testbed_spec",
    "spec_of",
    "testbed_path",
    "testbed_prompts",
    "testbed_spec_of",
    "write_labelled_prompts",
]

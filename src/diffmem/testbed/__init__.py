"""The testbed: a small Stable-Diffusion-format model diffmem trains on procedural data with known
memorized prompts. ``testbed_path()`` is the shipped pipeline folder."""

from __future__ import annotations

from pathlib import Path

from diffmem.errors import ModelLoadError

WEIGHTS_DIR = Path(__file__).parent / "weights"


def testbed_path() -> Path:
    """Folder of the shipped testbed pipeline (loads with ``StableDiffusionPipeline``)."""
    if not (WEIGHTS_DIR / "model_index.json").is_file():
        raise ModelLoadError(
            f"the shipped testbed model is missing from {WEIGHTS_DIR}; rebuild it with "
            "`diffmem testbed train --out DIR --install`")
    return WEIGHTS_DIR


__all__ = ["WEIGHTS_DIR", "testbed_path"]

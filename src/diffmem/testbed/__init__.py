"""The testbed: a small Stable-Diffusion-format model diffmem trains on procedural data with known
memorized prompts. ``testbed_path()`` is the shipped pipeline folder, ``shipped_testbed_spec()`` the
data it was trained on."""

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


def shipped_testbed_spec():
    """The :class:`~diffmem.testbed.data.TestbedSpec` the shipped testbed was trained on, for uses
    that need its data but no model (with a model, ask the adapter: ``adapter.testbed_spec``)."""
    from diffmem.testbed.verify import testbed_spec_of

    return testbed_spec_of(testbed_path())


__all__ = ["WEIGHTS_DIR", "shipped_testbed_spec", "testbed_path"]

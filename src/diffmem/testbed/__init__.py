"""The testbed: a small Stable-Diffusion-format model diffmem trains on procedural data with known
memorized prompts. ``testbed_path()`` is the shipped pipeline folder, ``shipped_testbed_spec()`` the
data it was trained on."""

from __future__ import annotations

from pathlib import Path

from diffmem.runtime.errors import ModelLoadError
from diffmem.similarity.report import DEFAULT_THRESHOLDS

WEIGHTS_DIR = Path(__file__).parent / "weights"

#: The testbed's replication criterion: a generation is a copy when its tiled L2 distance to the
#: nearest training image (as the model's VAE renders it) is below this (docs/testbed.md gives the
#: measured trade-off; :mod:`diffmem.testbed.verify` explains the criterion). The default copy
#: threshold of every tiled-L2 report (``eval replication``, ``demo``, ``testbed verify``); set in
#: :data:`diffmem.similarity.report.DEFAULT_THRESHOLDS` (0.15).
REPLICATION_THRESHOLD = DEFAULT_THRESHOLDS["tiled_l2"]


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


PROMPTS_FILE = "prompts.json"


def labelled_prompts(spec=None, folder: str | Path | None = None) -> list:
    """The labelled evaluation prompts (:class:`~diffmem.testbed.data.LabelledPrompt`) of a testbed
    spec (default: the shipped one), read from the ``prompts.json`` that a testbed folder (``folder``,
    else the shipped one) stores for its spec, so that listing 92 prompts does not rebuild the
    4,020-item dataset; built with :func:`~diffmem.testbed.data.build_testbed` when no stored list
    matches the spec."""
    import json

    from diffmem.testbed.data import LabelledPrompt, build_testbed

    spec = spec or shipped_testbed_spec()
    for base in ([Path(folder)] if folder is not None else []) + [WEIGHTS_DIR]:
        f = base / PROMPTS_FILE
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if data.get("spec") == spec.to_dict():
            return [LabelledPrompt(**row) for row in data["prompts"]]
    return build_testbed(spec).prompts


def write_labelled_prompts(folder: str | Path, spec) -> Path:
    """Store ``spec``'s labelled prompts as ``folder/prompts.json`` (read by
    :func:`labelled_prompts`)."""
    import json
    from dataclasses import asdict

    from diffmem.testbed.data import build_testbed

    path = Path(folder) / PROMPTS_FILE
    rows = [asdict(p) for p in build_testbed(spec).prompts]
    path.write_text(json.dumps({"spec": spec.to_dict(), "prompts": rows}, indent=1) + "\n",
                    encoding="utf-8")
    return path


def testbed_prompts(model: str | Path = "testbed") -> list:
    """Labelled prompts of a testbed model folder (or ``"testbed"``)."""
    from diffmem.testbed.verify import testbed_spec_of

    folder = testbed_path() if str(model) == "testbed" else Path(model)
    return labelled_prompts(testbed_spec_of(folder), folder)


__all__ = ["REPLICATION_THRESHOLD", "WEIGHTS_DIR", "labelled_prompts", "shipped_testbed_spec", "testbed_path",
           "testbed_prompts", "write_labelled_prompts"]

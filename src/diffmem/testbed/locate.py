"""Where the testbeds are and what they were trained on: the shipped folders, their data specs
(``testbed.json``), labelled prompts and generation labels. The package root re-exports these."""

from __future__ import annotations

import json
from pathlib import Path

from diffmem.models.profile import CRITERIA
from diffmem.runtime.errors import ConfigError, ModelLoadError
from diffmem.testbed.data import TestbedSpec

WEIGHTS_DIR = Path(__file__).parent / "weights"
#: Folder of the second testbed, ``testbed-graded`` (``MODELS`` in :mod:`diffmem.models.profile`).
GRADED_WEIGHTS_DIR = Path(__file__).parent / "weights_graded"

#: The testbed's replication criterion: a generation is a copy when its tiled L2 distance to the
#: nearest training image (as the model's VAE renders it) is below this (docs/testbed.md gives the
#: measured trade-off; :mod:`diffmem.testbed.verify` explains the criterion). The default copy
#: threshold of every tiled-L2 report (``eval replication``, ``demo``, ``testbed verify``).
REPLICATION_THRESHOLD = CRITERIA.get("tiled_l2").threshold  # 0.15, set in diffmem.models.profile


def testbed_path(name: str = "testbed") -> Path:
    """Folder of a shipped testbed pipeline by name (``"testbed"``, ``"testbed-graded"``: the
    folders of ``MODELS``; loads with ``StableDiffusionPipeline``); one clear error when its weights
    are not installed."""
    from diffmem.models.profile import MODELS

    folder = MODELS.get(name)
    if not (folder / "model_index.json").is_file():
        graded = " --graded" if name == "testbed-graded" else ""
        raise ModelLoadError(
            f"the shipped {name} model is missing from {folder}; rebuild it with "
            f"`diffmem testbed train --out DIR --install{graded}`")
    return folder


def spec_of(model):
    """The :class:`~diffmem.testbed.data.TestbedSpec` a model (adapter, folder or ``"testbed"``) was
    trained on, read from its folder's ``testbed.json``; ``None`` for a model that is no testbed (a
    pipeline object, whose folder is unknown, included)."""
    folder = _folder_of(model)
    if folder is None or not (folder / "testbed.json").is_file():
        return None
    return testbed_spec_of(folder)


def require_spec(model, what: str):
    """:func:`spec_of`, or one clear error naming ``what`` needs a testbed model."""
    spec = spec_of(model)
    if spec is None:
        where = _folder_of(model) or "the given pipeline object"
        raise ConfigError(f"{what} needs a diffmem testbed model (a folder with testbed.json); "
                          f"{where} is not one")
    return spec


def _folder_of(model) -> Path | None:
    from diffmem.models.profile import named_model

    if model is None:
        return WEIGHTS_DIR
    if isinstance(model, (str, Path)):
        return named_model(str(model)) or Path(model)
    return getattr(model, "path", None)


def labels_of(model) -> Path | None:
    """The generation labels (``broad_labels.jsonl``) that hold for a model's weights, from its
    profile: the shipped testbed's, or ``None`` for a model without labels."""
    from diffmem.models.profile import read_profile

    folder = _folder_of(model)
    return None if folder is None else read_profile(folder).labels


def shipped_testbed_spec():
    """The :class:`~diffmem.testbed.data.TestbedSpec` the shipped testbed was trained on, for uses
    that need its data but no model (with a model: :func:`spec_of`)."""
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
    """Labelled prompts of a testbed model folder (or a named one: ``"testbed"``,
    ``"testbed-graded"``)."""
    folder = _folder_of(model)
    return labelled_prompts(testbed_spec_of(folder), folder)


def testbed_spec_of(model_dir: str | Path) -> TestbedSpec:
    """The data spec a testbed pipeline folder was trained on (its ``testbed.json``), as
    :func:`diffmem.testbed.spec_of` reads it;
    a folder without one is no testbed (:class:`~diffmem.runtime.errors.ConfigError`)."""
    f = Path(model_dir) / "testbed.json"
    if not f.is_file():
        raise ConfigError(f"{model_dir} is not a diffmem testbed model (no testbed.json)")
    # folders written before n_rare_words existed were trained without rare words
    return TestbedSpec(**{"n_rare_words": 0, **json.loads(f.read_text())})

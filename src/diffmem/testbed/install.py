"""Installing a testbed into the package: its trained pipeline (:func:`install_pipeline`, into the
folder of its name in ``MODELS``: ``weights`` for ``testbed``, ``weights_graded`` for
``testbed-graded``) and, once labelled by generation, its labels (:func:`install_labels`: the
profile's ``labels`` and clean prompts)."""

from __future__ import annotations

import shutil
from pathlib import Path

from diffmem.models.profile import MODELS, ModelProfile, read_profile
from diffmem.runtime.errors import ConfigError, ModelLoadError
from diffmem.testbed.profile import testbed_name, write_testbed_profile

#: Name of the labels file beside a testbed's weights (``diffmem testbed label --install``).
LABELS_NAME = "broad_labels.jsonl"


def install_pipeline(pipeline_dir: str | Path, name: str | None = None) -> Path:
    """Copy a trained testbed pipeline into the package as the shipped model ``name`` (default:
    by its data spec, ``testbed`` or ``testbed-graded``), replacing what that folder held (labels
    of earlier weights included: they do not hold for new weights); its profile gets that name."""
    from diffmem.testbed.locate import testbed_spec_of

    src = Path(pipeline_dir)
    if not (src / "model_index.json").is_file():
        raise ModelLoadError(f"{src} is not a trained pipeline folder")
    is_testbed = (src / "testbed.json").is_file()
    if name is None:
        name = testbed_name(testbed_spec_of(src)) if is_testbed else "testbed"
    target = MODELS.get(name)
    if target.resolve() == src.resolve():
        raise ConfigError(f"{src} is already the installed {name} model")
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(src, target)
    if is_testbed:
        write_testbed_profile(target, name=name)
    return target


def labels_path(model: str | Path) -> Path:
    """Where a testbed's labels live beside its weights: ``<folder>/broad_labels.jsonl``."""
    from diffmem.testbed.locate import _folder_of

    return _folder_of(model) / LABELS_NAME


def install_labels(model: str | Path, labels: str | Path) -> ModelProfile:
    """Make ``labels`` (a ``diffmem testbed label`` file for ``model``'s weights; best kept beside
    them, ``<folder>/broad_labels.jsonl``) the model's labels: its profile's ``labels`` points to
    the file and its clean prompts become the file's clean controls that copy in no generation.
    Labels of another prompt set (another spec) are refused."""
    from diffmem.testbed.broad import broad_prompts, read_broad_labels
    from diffmem.testbed.locate import _folder_of, testbed_spec_of

    folder = _folder_of(model)
    spec = testbed_spec_of(folder)
    rows = read_broad_labels(labels)
    expected = [p.prompt for p in broad_prompts(spec)]
    if [r["prompt"] for r in rows] != expected:
        raise ConfigError(f"{labels} does not label the broad prompt set of {model} "
                          f"({len(rows)} rows, {len(expected)} prompts expected); finish it with "
                          "`diffmem testbed label` (rerun to resume)")
    write_testbed_profile(folder, spec, labels=Path(labels), name=read_profile(folder).name)
    return read_profile(folder)

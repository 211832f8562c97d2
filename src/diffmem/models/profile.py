"""What diffmem knows about a model beyond its weights: a **profile**, read as data from the model's
folder, never by importing the code that made it.

- :class:`CopyCriterion`: how a generation is judged a copy of a training image (name, threshold,
  direction); :data:`CRITERIA` holds the two diffmem uses, SSCD cosine > 0.5 (Somepalli et al. 2023;
  Wen et al. 2024) and the testbed's tiled L2 < 0.15 (docs/testbed.md).
- :class:`ModelProfile`: the model's known-clean prompts (for calibrating thresholds), its copy
  criterion and the fingerprint of its training set (to refuse another model's index). A diffmem
  testbed writes ``diffmem_profile.json`` beside its weights; any other folder has an empty profile.
- :data:`MODELS`: models known by name (``testbed``, ``testbed-graded``), as folders.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from diffmem.runtime.errors import ConfigError, ModelLoadError
from diffmem.runtime.registry import Registry

PROFILE_FILE = "diffmem_profile.json"


@dataclass(frozen=True)
class CopyCriterion:
    """A copy test: ``score > threshold`` when ``higher_is_copy`` (a similarity), else
    ``score < threshold`` (a distance). ``name`` is the index embedder's criterion name."""

    name: str
    threshold: float
    higher_is_copy: bool

    def copies(self, scores):
        """Elementwise copy test of an array or tensor of scores (the one place it is written)."""
        return scores > self.threshold if self.higher_is_copy else scores < self.threshold

    def margins(self, scores):
        """Elementwise distance to the threshold on the copy side (> 0: a copy)."""
        return scores - self.threshold if self.higher_is_copy else self.threshold - scores

    def is_copy(self, score: float) -> bool:
        """Whether ``score`` (one similarity or distance) is a copy."""
        return bool(self.copies(score))

    def margin(self, score: float) -> float:
        """How far ``score`` sits on the copy side of the threshold (> 0: a copy)."""
        return float(self.margins(score))

    def closer(self, a: float, b: float) -> bool:
        """Whether score ``a`` is more alike than score ``b``."""
        return bool(a > b if self.higher_is_copy else a < b)

    def at(self, threshold: float | None) -> CopyCriterion:
        """The same criterion with another threshold (``None``: this one)."""
        return self if threshold is None else replace(self, threshold=float(threshold))


#: The copy criteria by name: SSCD cosine similarity above 0.5, and the testbed's tiled L2 distance
#: (grid 4) to the VAE rendering of the nearest training image below 0.15.
CRITERIA: Registry[CopyCriterion] = Registry("copy criterion", {
    "sscd_cosine": CopyCriterion("sscd_cosine", 0.5, higher_is_copy=True),
    "tiled_l2": CopyCriterion("tiled_l2", 0.15, higher_is_copy=False),
})


def copy_criterion(name: str, threshold: float | None = None) -> CopyCriterion:
    """The criterion ``name`` (:data:`CRITERIA`), at ``threshold`` when one is given."""
    return CRITERIA.get(name).at(threshold)


@dataclass(frozen=True)
class ModelProfile:
    """Facts about a model that methods receive as data.

    Attributes:
        name: the profile's name (``"testbed"``, ``"testbed-graded"``; ``None``: a plain model).
        clean_prompts: prompts known not to copy under this model (thresholds are calibrated on
            them); empty when none are known.
        criterion: name of the copy criterion of this model's replication checks.
        training_set: fingerprint of the training set (an index built from another set is
            refused); ``None`` when unknown.
        labels: file of generation labels valid for these weights (absolute), or ``None``.
        data: the data spec the model was trained on (the testbed's), as JSON data.
        sscd_lowpass: the SSCD convention's low-pass size for this model's images
            (:class:`~diffmem.similarity.sscd.SSCD` ``lowpass``; ``None``: none). The graded
            testbed's 64-px images: 32 (docs/testbed.md).
    """

    name: str | None = None
    clean_prompts: tuple[str, ...] = ()
    criterion: str = "sscd_cosine"
    training_set: str | None = None
    labels: Path | None = None
    data: dict = field(default_factory=dict)
    sscd_lowpass: int | None = None

    @property
    def is_testbed(self) -> bool:
        """Whether this is a diffmem testbed (its data spec is known)."""
        return bool(self.data)

    @property
    def copy_criterion(self) -> CopyCriterion:
        return copy_criterion(self.criterion)

    def save(self, folder: str | Path) -> Path:
        """Write the profile as ``folder/diffmem_profile.json`` (``labels`` relative to it)."""
        folder = Path(folder)
        labels = (os.path.relpath(self.labels, folder) if self.labels is not None else None)
        data = {"name": self.name, "clean_prompts": list(self.clean_prompts),
                "criterion": self.criterion, "training_set": self.training_set,
                "labels": labels, "data": self.data}
        if self.sscd_lowpass is not None:
            data["sscd_lowpass"] = self.sscd_lowpass
        path = folder / PROFILE_FILE
        path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        return path


def read_profile(folder: str | Path | None) -> ModelProfile:
    """The profile stored in a model folder (``diffmem_profile.json``); an empty profile for a
    folder without one or for a pipeline object (``None``)."""
    if folder is None:
        return ModelProfile()
    path = Path(folder) / PROFILE_FILE
    if not path.is_file():
        return ModelProfile()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        labels = (Path(folder) / raw["labels"]).resolve() if raw.get("labels") else None
        return ModelProfile(name=raw.get("name"), clean_prompts=tuple(raw.get("clean_prompts", ())),
                            criterion=raw.get("criterion", "sscd_cosine"),
                            training_set=raw.get("training_set"),
                            labels=labels if labels is not None and labels.is_file() else None,
                            data=dict(raw.get("data") or {}),
                            sscd_lowpass=(int(raw["sscd_lowpass"])
                                          if raw.get("sscd_lowpass") is not None else None))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not a readable diffmem profile ({e})") from None


_PACKAGE = Path(__file__).resolve().parent.parent

#: Models known by name: the shipped testbeds (folders inside the package, found as data).
MODELS: Registry[Path] = Registry("model", {
    "testbed": _PACKAGE / "testbed" / "weights",
    "testbed-graded": _PACKAGE / "testbed" / "weights_graded",
    "testbed-ddpm": _PACKAGE / "testbed" / "weights_ddpm",  # pixel-space DDPMPipeline
    "testbed-ddpm-class": _PACKAGE / "testbed" / "weights_ddpm_class",
})


def named_model(name: str) -> Path | None:
    """The folder of a model known by name (:data:`MODELS`), ``None`` for any other string; a
    named model whose weights are missing is one clear error."""
    if name not in MODELS or Path(name).exists():  # a folder of that name is a folder
        return None
    folder = MODELS.get(name)
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"the shipped model {name!r} is missing from {folder}; rebuild it with "
                          f"`diffmem testbed train --out DIR --install`"
                          + {"testbed-graded": " --graded", "testbed-ddpm": " --ddpm",
                             "testbed-ddpm-class": " --ddpm --class-conditional"}.get(name, ""))
    return folder

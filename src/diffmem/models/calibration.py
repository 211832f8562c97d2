"""Calibrations: a detector's threshold for one model, stored so that a user calibrates once.

A :class:`Calibration` records the detector (registry name and the settings that change its
scores), the threshold, the false-positive rate it was set at, how many clean prompts it was fitted
on, and the **fingerprint of the model's weights** it belongs to (:func:`weights_fingerprint`): a
calibration is never applied to other weights. :class:`CalibrationStore` keeps them as JSON files
(``$DIFFMEM_CACHE/calibrations``, default ``~/.cache/diffmem/calibrations``).

The threshold rule, :func:`threshold_at_fpr`, is the one place that turns clean scores into a
threshold (the ``1 - fpr`` quantile, "higher" interpolation: at most ``fpr`` of the clean scores
lie above it).

The training index of a model can be stored beside its calibrations (``diffmem calibrate
--index``, :meth:`CalibrationStore.put_index`, keyed by the same fingerprint); :func:`choose_index`
is the one place every command looks it up when it is given no index.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from diffmem.runtime.errors import ConfigError


def threshold_at_fpr(clean_scores: Sequence[float] | np.ndarray, fpr: float) -> float:
    """The threshold above which at most ``fpr`` of ``clean_scores`` lie (the ``1 - fpr`` quantile,
    ``method="higher"``: always one of the scores)."""
    scores = np.asarray(clean_scores, dtype=float)
    return float(np.quantile(scores, 1 - fpr, method="higher"))


@dataclass(frozen=True)
class Calibration:
    """A detector's threshold for the model whose weights have fingerprint ``model``."""

    detector: str
    settings: dict
    threshold: float
    fpr: float
    n_clean: int
    model: str
    clean_prompts: str = ""  # sha256[:12] of the clean prompts it was fitted on
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return calibration_key(self.model, self.detector, self.settings, self.clean_prompts)


def calibration_key(model: str, detector: str, settings: dict, clean_prompts: str = "") -> str:
    text = json.dumps([model, detector, settings, clean_prompts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def prompts_digest(prompts: Sequence[str]) -> str:
    """Identity of a list of clean prompts (order included)."""
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()[:12]


def default_cache_dir() -> Path:
    root = os.environ.get("DIFFMEM_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "diffmem"


@dataclass(frozen=True)
class StoredIndex:
    """The training index ``diffmem calibrate --index`` recorded for the weights ``model``."""

    model: str  # the weights' fingerprint
    path: str  # the index folder (absolute)
    record: str  # the file recording it
    extra: dict = field(default_factory=dict)


class CalibrationStore:
    """Calibrations as JSON files in ``folder`` (default ``$DIFFMEM_CACHE/calibrations``)."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else default_cache_dir() / "calibrations"

    def get(self, model: str, detector: str, settings: dict, clean_prompts: str = ""
            ) -> Calibration | None:
        path = self.folder / f"{calibration_key(model, detector, settings, clean_prompts)}.json"
        try:
            return Calibration(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None  # none stored, or unreadable: calibrate again

    def latest(self, model: str, detector: str) -> Calibration | None:
        """The most recently stored calibration of ``detector`` for these weights, whatever its
        settings and clean prompts (what ``diffmem calibrate`` stored), else ``None``."""
        found = []
        for path in self.folder.glob("*.json") if self.folder.is_dir() else ():
            try:
                cal = Calibration(**json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError):
                continue
            if cal.model == model and cal.detector == detector:
                found.append((path.stat().st_mtime, cal))
        return max(found, key=lambda x: x[0])[1] if found else None

    # -- the training index stored with the calibration (``diffmem calibrate --index``)
    def index_record(self, model: str) -> Path:
        """The file recording the training index of the weights ``model`` (a fingerprint)."""
        return self.folder / "indexes" / f"{hashlib.sha256(model.encode()).hexdigest()[:20]}.json"

    def put_index(self, model: str, path: str | Path, **extra) -> StoredIndex:
        """Record ``path`` (made absolute) as the training index of the weights ``model``."""
        record = self.index_record(model)
        record.parent.mkdir(parents=True, exist_ok=True)
        data = {"model": model, "path": str(Path(path).resolve()), "extra": extra}
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, record)
        return StoredIndex(record=str(record), **data)

    def get_index(self, model: str) -> StoredIndex | None:
        """The training index recorded for the weights ``model``, else ``None`` (also when the
        record is unreadable). Whether its folder still exists is :func:`choose_index`'s check."""
        record = self.index_record(model)
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
            found = StoredIndex(record=str(record), **data)
        except (OSError, ValueError, TypeError):
            return None
        return found if found.model == model else None

    def has_indexes(self) -> bool:
        """Whether any training index is recorded (no model needs loading when none is)."""
        folder = self.folder / "indexes"
        return folder.is_dir() and any(folder.glob("*.json"))

    def put(self, cal: Calibration) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{cal.key}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(cal), indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path


def check_calibration(cal: Calibration, fingerprint: str) -> Calibration:
    """``cal`` if it belongs to the weights ``fingerprint``, else one clear error."""
    if cal.model != fingerprint:
        raise ConfigError(f"the calibration of {cal.detector} was made for other weights "
                          f"({cal.model}, this model is {fingerprint}); run `diffmem calibrate` "
                          "for this model")
    return cal


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def weights_fingerprint(adapter) -> str:
    """``"weights:<sha256[:16]>"`` of the UNet's and text encoders' parameters (names, shapes and
    values), cached per UNet object (weights changed in place after the first call are not
    seen). Two folders with the same weights share it."""
    modules = [m for m in (adapter.unet, getattr(adapter, "text_encoder", None),
                           getattr(adapter.pipe, "text_encoder_2", None)) if m is not None]
    if adapter.unet in _FINGERPRINTS:
        return _FINGERPRINTS[adapter.unet]
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for m in modules:
            for name, t in m.state_dict().items():
                h.update(name.encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    _FINGERPRINTS[adapter.unet] = fp = "weights:" + h.hexdigest()[:16]
    return fp


# ----------------------------------------------------------------------------- the index to use


@dataclass(frozen=True)
class IndexChoice:
    """The training index a command uses and where it came from: ``"given"`` (``--index``, a
    service's config), ``"stored"`` (``diffmem calibrate --index``), ``"none"`` (neither) or
    ``"off"`` (``--no-index``)."""

    index: object | None
    origin: str
    stored: StoredIndex | None = None

    def note(self) -> str | None:
        """The one line a command prints when it uses the stored index, else ``None``."""
        if self.stored is None:
            return None
        return (f"using the training index stored by `diffmem calibrate --index` for this model's "
                f"weights: {self.stored.path} (recorded in {self.stored.record}; --no-index: "
                "without it)")

    def describe(self) -> dict:
        """JSON data for a summary: the index (its folder) and its origin."""
        where = self.index if self.index is None or isinstance(self.index, (str, Path)) \
            else getattr(self.index, "path", type(self.index).__name__)
        out = {"index": None if where is None else str(where), "origin": self.origin}
        if self.stored is not None:
            out["record"] = self.stored.record
        return out


def choose_index(index, adapter=None, *, load=None, use_stored: bool = True,
                 store: CalibrationStore | None = None) -> IndexChoice:
    """The training index a command uses: ``index`` when given; else, unless ``use_stored`` is
    False, the one ``diffmem calibrate --index`` stored for the model's weights.

    The model is ``adapter``, or ``load()`` (called only when the store records some index, so a
    command without one loads and fingerprints nothing more). A stored folder that no longer
    exists is one :class:`ConfigError` naming ``diffmem calibrate --index``, never a silent run
    without it. Whether the index holds this model's training set is checked where it is used
    (:func:`diffmem.similarity.index_compat.check_index_model_once`), as for a given one."""
    if index is not None:
        return IndexChoice(index, "given")
    if not use_stored:
        return IndexChoice(None, "off")
    store = store or CalibrationStore()
    if not store.has_indexes():
        return IndexChoice(None, "none")
    if adapter is None:
        if load is None:
            raise ConfigError("choose_index needs the model (adapter= or load=)")
        adapter = load()
    found = store.get_index(weights_fingerprint(adapter))
    if found is None:
        return IndexChoice(None, "none")
    if not Path(found.path).is_dir():
        raise ConfigError(f"the training index stored for this model's weights no longer exists: "
                          f"{found.path} (recorded in {found.record}); store its new folder with "
                          "`diffmem calibrate --model MODEL --index DIR`, or pass --index DIR or "
                          "--no-index")
    return IndexChoice(found.path, "stored", found)

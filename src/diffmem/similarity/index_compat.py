"""Whether a training index belongs to a model: the compatibility policy.

An index's ``provenance`` records, when known, whose training set it holds (``"training_set"``,
e.g. ``"testbed:<spec hash>"``) and what rendered its images (``"rendered_by"``,
``"vae:<weights hash>"``). :func:`check_index_matches` compares that with what the caller expects
of its model, given as data (a fingerprint string), so that a method refuses an index of another
model's data with one :class:`~diffmem.runtime.errors.ConfigError`.

The fingerprints are made here (:func:`training_set_fingerprint`, :func:`vae_fingerprint`), the
one definition that :mod:`diffmem.testbed.index` records and the checks compare.
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from collections.abc import Callable

import torch

from diffmem.runtime.errors import ConfigError

#: Training-set fingerprints of testbed models start with this.
TESTBED_PREFIX = "testbed:"


def training_set_fingerprint(kind: str, description: dict) -> str:
    """``"<kind>:<sha256[:12]>"`` of a training set's description (its sorted JSON): e.g.
    ``training_set_fingerprint("testbed", spec.to_dict())`` for a testbed."""
    text = json.dumps(description, sort_keys=True)
    return f"{kind}:" + hashlib.sha256(text.encode()).hexdigest()[:12]


@torch.no_grad()
def vae_fingerprint(adapter) -> str:
    """``"vae:<sha256[:12]>"`` of a model's VAE weights (the renderer of a testbed index)."""
    h = hashlib.sha256()
    for name, tensor in sorted(adapter.vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return "vae:" + h.hexdigest()[:12]


def model_training_set(adapter) -> str | None:
    """The training-set fingerprint a model's index should record: its profile's
    (:attr:`diffmem.models.profile.ModelProfile.training_set`; None: not known)."""
    profile = getattr(adapter, "profile", None)
    return None if profile is None else profile.training_set


def check_index_matches(index, expected_training_set: str | None, what: str, *,
                        criterion: str | None = None,
                        renderer: str | Callable[[], str] | None = None) -> None:
    """One :class:`ConfigError` unless ``index`` holds the training set ``expected_training_set``
    (a fingerprint, or None when the model's is not known), measured with ``criterion``.

    ``criterion`` defaults to tiled L2 for a testbed training set (``"testbed:..."``), SSCD cosine
    otherwise. A testbed model accepts only an index recording its testbed, and, when ``renderer``
    (the model's :func:`vae_fingerprint`, or a callable giving it, called only when needed) is
    given, rendered by its VAE (``diffmem index build testbed``). A model of unknown training set
    refuses only a testbed index, since nothing else is recorded; one of a known non-testbed
    training set also refuses an index recording another. ``what`` names the method in messages.
    """
    testbed = expected_training_set is not None and expected_training_set.startswith(TESTBED_PREFIX)
    expected = criterion or ("tiled_l2" if testbed else "sscd_cosine")
    have = index.embedder.criterion
    if have != expected:
        raise ConfigError(
            f"{what}: this model expects a {expected} index but the index measures {have}"
            + (" (testbed models are measured by tiled L2: `diffmem index build testbed`)"
               if testbed else "") + "; pass criterion= to override")
    prov = getattr(index, "provenance", {}) or {}
    recorded = prov.get("training_set")
    if testbed:
        if recorded != expected_training_set:
            raise ConfigError(
                f"{what}: the index holds {recorded or 'images of unrecorded origin'}, not this "
                f"testbed model's training set ({expected_training_set}); build it with "
                f"`diffmem index build testbed --out IDX`")
        rendered = prov.get("rendered_by")
        if rendered is not None and renderer is not None:
            mine = renderer() if callable(renderer) else renderer
            if rendered != mine:
                raise ConfigError(f"{what}: the index's images were rendered by another VAE "
                             f"({rendered}) than this model's; rebuild the index for it")
    elif recorded is not None and str(recorded).startswith(TESTBED_PREFIX):
        raise ConfigError(f"{what}: the index holds a testbed's training set ({recorded}) but "
                     f"the model is not that testbed")
    elif recorded is not None and expected_training_set is not None \
            and recorded != expected_training_set:
        raise ConfigError(f"{what}: the index holds {recorded}, not this model's training set "
                     f"({expected_training_set})")


def check_index_model(index, adapter, *, criterion: str | None = None,
                      who: str = "this method") -> None:
    """:func:`check_index_matches` with the expectation read from a model adapter
    (:func:`model_training_set`, its VAE as the renderer). A model whose profile names an SSCD
    low-pass (``sscd_lowpass``, the graded testbed) also accepts an SSCD index of its training
    set built with that low-pass (its second criterion)."""
    profile = getattr(adapter, "profile", None)
    lowpass = getattr(profile, "sscd_lowpass", None)
    if criterion is None and lowpass is not None and index.embedder.criterion == "sscd_cosine":
        # the model's second criterion: SSCD with its low-pass (the graded testbed)
        criterion = "sscd_cosine"
        if getattr(index.embedder, "lowpass", None) != lowpass:
            raise ConfigError(f"{who}: this model's SSCD index low-passes its images to "
                              f"{lowpass} px, the index does not; build it with `diffmem index "
                              f"build {profile.name or 'SOURCE'} --kind sscd`")
    if criterion is None and profile is not None and profile.training_set is not None:
        criterion = profile.criterion  # the model's own (the pixel testbed's: tiled L2)
    elif criterion is None and not getattr(adapter, "text_conditioned", True):
        criterion = "tiled_l2"  # a pixel-space DDPM of unknown training set: the pixel index
    check_index_matches(index, model_training_set(adapter), who, criterion=criterion,
                        renderer=lambda: vae_fingerprint(adapter))



#: adapter -> {index -> criteria} of the checks that passed (weak: forgotten with either object)
_PASSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PASSED_LOCK = threading.Lock()


def check_index_model_once(index, adapter, *, criterion: str | None = None,
                           who: str = "this method") -> None:
    """:func:`check_index_model`, made once per (index, adapter, criterion): a check that passed
    is remembered beside the two objects (weakly), not on the method that asks, so a detector or
    mitigation keeps no state of its runs and the VAE fingerprint of a testbed model is not
    recomputed for every batch. A check that fails is not remembered."""
    with _PASSED_LOCK:
        done = criterion in _PASSED.get(adapter, {}).get(index, ())
    if done:
        return
    check_index_model(index, adapter, criterion=criterion, who=who)
    with _PASSED_LOCK:
        per_index = _PASSED.setdefault(adapter, weakref.WeakKeyDictionary())
        per_index.setdefault(index, set()).add(criterion)

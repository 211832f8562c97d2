"""Index the testbed's training set (the function behind ``diffmem index build testbed``).

The index is de-duplicated (one item per training image) and keeps what AMG's duplicated-caption
guidance needs (Chen et al. CVPR 2024, G_dup): every caption of an image and the number of training
copies it stands for. Training draws a memorized (verbatim or template) image with probability
``memorized_fraction / n_memorized`` per sample and a generic one with ``(1 - memorized_fraction)
/ n_generic`` (:class:`diffmem.testbed.train.TrainConfig`), so a memorized image counts as
``round(ratio of the two)`` copies of a generic one (164 with the shipped defaults: 0.45 / 20 vs
0.55 / 4000); generic images count 1.

``provenance`` records the training set (a hash of the :class:`TestbedSpec`) and the VAE that
rendered the images (a hash of its weights), so that a method can refuse another model's index
(the fingerprints and the check: :mod:`diffmem.similarity.index_compat`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffmem.similarity.index import PixelSpace, TrainingIndex
from diffmem.similarity.index_compat import training_set_fingerprint
from diffmem.similarity.index_compat import vae_fingerprint as vae_fingerprint  # defined there
from diffmem.similarity.pixel import to_tensor
from diffmem.testbed.data import MEMORIZED_FRACTION, TestbedSpec, build_testbed


def build_testbed_index(out: str | Path | None = None, *, kind: str = "pixel",
                        spec: TestbedSpec | None = None, rendered_by=None,
                        embedder: object | None = None) -> TrainingIndex:
    """A :class:`TrainingIndex` of every testbed training image with its first caption.

    ``rendered_by`` (a model adapter): index the images as that model's VAE renders them (the
    reference of :func:`diffmem.testbed.verify.verify_testbed`), not the originals.

    ``kind="pixel"`` (default) searches by tiled L2, the testbed's replication criterion;
    ``kind="sscd"`` embeds with SSCD (the graded testbed's images low-passed to 32 px first,
    ``embedder=SSCD(lowpass=32)``, its profile's ``sscd_lowpass``; the first testbed's VAE loses
    thin shapes, so SSCD does not judge its copies). ``embedder`` overrides the kind's default.
    Saved to ``out`` when given.
    """
    from diffmem.runtime.progress import progress

    testbed = build_testbed(spec)
    ids, captions, arrays, copies = [], [], [], []
    dup = memorized_copies(testbed.spec)
    n = len(testbed.items)
    # one bar for the job: render each image (and pass it through the VAE), then index
    with progress(2 * n if rendered_by is not None else n, "index testbed", unit="img") as bar:
        for item, img in testbed.images():
            ids.append(item.image_id)
            captions.append(list(item.captions))
            copies.append(item.copies if testbed.spec.counts else
                          1 if item.kind == "generic" else dup)
            arrays.append(img)
            bar.update(1)
        provenance = {"training_set": testbed_fingerprint(testbed.spec)}
        images = to_tensor(np.stack(arrays))
        if rendered_by is not None:
            from diffmem.testbed.verify import vae_roundtrip

            images = vae_roundtrip(rendered_by, images, on_batch=bar.update)
            provenance["rendered_by"] = vae_fingerprint(rendered_by)
    if embedder is None and kind == "pixel":
        embedder = PixelSpace(size=testbed.spec.resolution)
    elif embedder is None:
        from diffmem.similarity.index import _embedder_for_kind

        embedder = _embedder_for_kind(kind)
    index = TrainingIndex.build(images, captions, ids, embedder, copies=copies,
                                provenance=provenance)
    if out is not None:
        index.save(out)
    return index


def memorized_copies(spec: TestbedSpec, memorized_fraction: float | None = None) -> int:
    """Training copies of one memorized image relative to one generic image (see module doc)."""
    f = MEMORIZED_FRACTION if memorized_fraction is None else memorized_fraction
    n_mem = spec.n_verbatim + spec.n_template
    if n_mem == 0 or spec.n_generic == 0 or f <= 0:
        return 1
    if f >= 1:
        raise ValueError("memorized_fraction must be < 1")
    return max(1, round((f / n_mem) / ((1 - f) / spec.n_generic)))


def testbed_fingerprint(spec: TestbedSpec) -> str:
    """``"testbed:<sha256[:12]>"`` of a testbed spec: the identity of its training set."""
    return training_set_fingerprint("testbed", spec.to_dict())

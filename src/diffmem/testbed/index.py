"""Index the testbed's training set (the function behind ``diffmem index build testbed``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffmem.similarity.index import PixelSpace, TrainingIndex
from diffmem.similarity.pixel import to_tensor
from diffmem.testbed.data import TestbedSpec, build_testbed


def build_testbed_index(out: str | Path | None = None, *, kind: str = "pixel",
                        spec: TestbedSpec | None = None, rendered_by=None) -> TrainingIndex:
    """A :class:`TrainingIndex` of every testbed training image with its first caption.

    ``rendered_by`` (a model adapter): index the images as that model's VAE renders them (the
    reference of :func:`diffmem.testbed.verify.verify_testbed`), not the originals.

    ``kind="pixel"`` (default) searches by tiled L2, the testbed's replication criterion;
    ``kind="sscd"`` embeds with SSCD (informative only on these flat synthetic images).
    Saved to ``out`` when given.
    """
    testbed = build_testbed(spec)
    ids, captions, arrays = [], [], []
    for item, img in testbed.images():
        ids.append(item.image_id)
        captions.append(item.captions[0])
        arrays.append(img)
    images = to_tensor(np.stack(arrays))
    if rendered_by is not None:
        from diffmem.testbed.verify import vae_roundtrip

        images = vae_roundtrip(rendered_by, images)
    if kind == "pixel":
        embedder: object = PixelSpace(size=testbed.spec.resolution)
    else:
        from diffmem.similarity.index import _embedder_for_kind

        embedder = _embedder_for_kind(kind)
    index = TrainingIndex.build(images, captions, ids, embedder)
    if out is not None:
        index.save(out)
    return index

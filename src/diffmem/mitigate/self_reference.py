"""The guard's reference when no training index is given: the model's own plain images.

A memorized prompt makes the model reproduce one training image from every initial noise (Carlini
et al. 2023 find training images by exactly this: many generations of one prompt that are copies
of each other; Somepalli et al. 2023 call it replication). So, without the training set, two
images of the same prompt that are copies of each other *by the model's own copy criterion*
(:class:`~diffmem.models.profile.CopyCriterion`: tiled L2 < 0.15 on the testbed, SSCD > 0.5 on
SD) are taken as a copy of a training image (:func:`agreement`): no UNet call when the prompt has
several images in the batch (``--images-per-prompt``), one probe image from another seed when it
has one (the guard's ``probe``).

The flagged plain images then stand in for the training image: :func:`self_reference_index` puts
them in a small :class:`~diffmem.similarity.index.TrainingIndex` of the model's criterion, which
the guard verifies mitigated images against (an image may be served when it stays the guard's
margin beyond the criterion from every flagged plain image) and which AMG (Chen et al. 2024,
eq. 5-9) is guided away from, as it would be from the nearest training image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from diffmem.models.profile import CopyCriterion, copy_criterion


def criterion_of(adapter) -> CopyCriterion:
    """The model's copy criterion (its profile's; SSCD for a model without one)."""
    profile = getattr(adapter, "profile", None)
    return copy_criterion(profile.criterion if profile is not None else "sscd_cosine")


def embedder_of(criterion: CopyCriterion):
    """The index embedder that measures ``criterion``."""
    from diffmem.similarity.index_build import embedder_for_kind

    return embedder_for_kind("pixel" if criterion.name == "tiled_l2" else "sscd")


def self_reference_index(adapter, images: torch.Tensor, labels: Sequence[str],
                         captions: Sequence[str]):
    """A :class:`~diffmem.similarity.index.TrainingIndex` of ``images`` (``(N, 3, H, W)`` in
    [-1, 1], the model's own plain images) in the model's criterion, ids ``labels``; recorded as
    the model's training set (it stands in for it) with ``source: own plain generations``."""
    from diffmem.similarity.index import TrainingIndex
    from diffmem.similarity.index_compat import model_training_set

    return TrainingIndex.build(
        images.float().clamp(-1, 1).cpu(), captions=list(captions), ids=list(labels),
        embedder=embedder_of(criterion_of(adapter)),
        provenance={"training_set": model_training_set(adapter),
                    "source": "own plain generations"})


@dataclass
class Agreement:
    """Per image: the nearest other image of the same prompt (its row, None if the prompt has one
    image), the similarity in the criterion's units, and whether the two are copies of each
    other."""

    nearest: list[int | None]
    similarity: list[float | None]
    copies: np.ndarray  # (N,) bool


def agreement(adapter, images: torch.Tensor, prompts: Sequence[str],
              seeds: Sequence[int] | None = None, *, margin: float = 0.0) -> Agreement:
    """For each image, the most similar other image of the same prompt from another seed (the
    same prompt and seed give the same image by construction, which says nothing), by the
    model's copy criterion; ``copies[i]``: the two are copies of each other (both then count as
    copies of a memorized training image). ``seeds`` None: every image has its own seed.
    ``margin``: how far inside the criterion two images must be to count as copies of each other
    (criterion units; 0: the criterion itself)."""
    crit = criterion_of(adapter)
    n = len(prompts)
    nearest: list[int | None] = [None] * n
    sims: list[float | None] = [None] * n
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    rows = [i for g in groups.values() if len(g) > 1 for i in g]
    if rows:
        index = self_reference_index(adapter, images[rows], [str(i) for i in rows],
                                     [prompts[i] for i in rows])
        found = index.search(images[rows].float().clamp(-1, 1).cpu(), k=len(rows))
        for q, i in enumerate(rows):
            for j, s in zip(found.ids[q], found.scores[q].tolist(), strict=True):
                j = int(j)
                if j != i and prompts[j] == prompts[i] and (seeds is None
                                                             or seeds[j] != seeds[i]):
                    nearest[i], sims[i] = j, float(s)
                    break
    copies = np.array([s is not None and crit.margin(s) > margin for s in sims], dtype=bool)
    return Agreement(nearest, sims, copies)

"""Fixtures for the similarity tests: a fake embedder and tiny synthetic images."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F


class MeanColourEmbedder:
    """A cheap deterministic embedder: per-channel means of a 4x4 pooling, L2-normalised (48-d)."""

    name = "mean-colour-test"
    preprocessing = "pool4x4"
    dim = 48
    criterion = "sscd_cosine"
    higher_is_better = True

    def embed(self, images):
        if not isinstance(images, torch.Tensor):
            images = torch.stack([F.interpolate(i[None], size=(16, 16))[0] for i in images])
        pooled = F.adaptive_avg_pool2d(images.float(), 4).flatten(1)
        return F.normalize(pooled + 1e-3, dim=-1)


@pytest.fixture
def embedder():
    return MeanColourEmbedder()


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(24, 3, 16, 16, generator=g) * 2 - 1

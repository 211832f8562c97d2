"""Pixel-space replication metrics.

Convention: images are float tensors ``(N, 3, H, W)`` in ``[-1, 1]`` (diffusers' VAE output range).
Use :func:`to_tensor` to convert uint8 arrays or PIL images.

- :func:`tiled_l2` -- Carlini et al. (2023), "Extracting Training Data from Diffusion Models",
  Sec. 4.1: split both images into a ``grid x grid`` array of tiles and take the *largest* per-tile
  distance, so that an image only counts as close when every region is close. Here the per-tile
  distance is the RMS difference, so values are comparable across resolutions (0 = identical,
  2 = maximal).
- :func:`nl2` -- Carlini et al. (2023), Sec. 5.1, used by AMG (Chen et al., CVPR 2024): distance to
  the nearest reference divided by ``alpha`` times the mean distance to the ``k`` nearest.
- :class:`PixelSpace` -- the "embedder" of a pixel-kind :class:`~diffmem.similarity.index.TrainingIndex`:
  images downsampled and compared by tiled L2.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffmem.runtime.errors import ConfigError
from diffmem.runtime.images import to_unit_range


def to_tensor(images: Sequence | np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` / ``(H, W, 3)`` arrays or PIL images -> float ``(N, 3, H, W)`` in
    ``[-1, 1]`` (by :func:`diffmem.runtime.images.to_unit_range`). A tensor is taken to be ``(N, 3, H, W)``
    already: uint8 is scaled, float returned as float."""
    if isinstance(images, torch.Tensor):
        return to_unit_range(images) if images.dtype == torch.uint8 else images.float()
    if not isinstance(images, np.ndarray):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    if images.ndim == 3:
        images = images[None]
    return to_unit_range(images).permute(0, 3, 1, 2)


def _tiles(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, C, H, W) -> (grid*grid, N, C*th*tw) with H, W divisible by grid."""
    n, c, h, w = x.shape
    if h % grid or w % grid:
        raise ValueError(f"image size {h}x{w} is not divisible by grid={grid}")
    th, tw = h // grid, w // grid
    t = x.reshape(n, c, grid, th, grid, tw).permute(2, 4, 0, 1, 3, 5)
    return t.reshape(grid * grid, n, c * th * tw)


def tiled_l2(x: torch.Tensor, y: torch.Tensor, *, grid: int = 4) -> torch.Tensor:
    """Tiled L2 between paired images ``x[i]`` and ``y[i]``: max over tiles of the RMS difference.

    Differentiable. Returns shape ``(N,)``.
    """
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(y.shape)}")
    d = _tiles(x - y, grid)  # (T, N, P)
    return d.pow(2).mean(-1).sqrt().amax(0)


def pairwise_tiled_l2(x: torch.Tensor, y: torch.Tensor, *, grid: int = 4,
                      chunk: int = 1024) -> torch.Tensor:
    """Tiled L2 between every ``x[i]`` and ``y[j]``; returns ``(N, M)``. Memory is O(chunk * M)."""
    return pairwise_tiled_l2_prepared(x, *prepare_tiles(y, grid), grid=grid, chunk=chunk)


def prepare_tiles(y: torch.Tensor, grid: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference images ``y`` as float tiles ``(T, M, P)`` and their squared norms ``(T, M)``,
    for repeated :func:`pairwise_tiled_l2_prepared` searches against the same references."""
    ty = _tiles(y.float(), grid).contiguous()
    return ty, ty.pow(2).sum(-1)


def pairwise_tiled_l2_prepared(x: torch.Tensor, ty: torch.Tensor, yy: torch.Tensor, *,
                               grid: int = 4, chunk: int = 1024) -> torch.Tensor:
    """:func:`pairwise_tiled_l2` against references prepared by :func:`prepare_tiles`."""
    p = ty.shape[-1]
    rows = []
    for i in range(0, x.shape[0], chunk):
        tx = _tiles(x[i : i + chunk].float(), grid)  # (T, n, P)
        xx = tx.pow(2).sum(-1)  # (T, n)
        d2 = xx[:, :, None] + yy[:, None, :] - 2 * torch.bmm(tx, ty.transpose(1, 2))
        rows.append((d2.clamp_min(0) / p).sqrt().amax(0))
    return torch.cat(rows)


def nearest_tiled_l2(x: torch.Tensor, refs: torch.Tensor, *, grid: int = 4,
                     chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """For each ``x`` image, the tiled-L2 distance to its nearest ``refs`` image and its index."""
    dists, idxs = [], []
    for i in range(0, x.shape[0], chunk):
        d = pairwise_tiled_l2(x[i : i + chunk], refs, grid=grid)
        v, j = d.min(1)
        dists.append(v)
        idxs.append(j)
    return torch.cat(dists), torch.cat(idxs)


def _pairwise_rms(x: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """RMS (per-pixel) L2 distance between every ``x[i]`` and ``refs[j]``; ``(N, M)``.

    Differentiable everywhere: the square root is taken of ``max(d^2, 1e-12)``.
    """
    a = x.reshape(x.shape[0], -1).float()
    b = refs.reshape(refs.shape[0], -1).to(a)
    d2 = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1) - 2 * a @ b.T
    return (d2 / a.shape[1]).clamp_min(1e-12).sqrt()


def nl2(x: torch.Tensor, refs: torch.Tensor, *, k: int = 50, alpha: float = 0.5,
        chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised L2 of each ``x[i]`` to the reference set ``refs``, and its nearest reference.

    Carlini et al. (2023), "Extracting Training Data from Diffusion Models", Sec. 5.1 (used by
    Chen et al., CVPR 2024, AMG, for CIFAR-10):

        nL2(x, D) = l2(x, n_0) / (alpha * mean_{y in S_k(x)} l2(x, y))

    where ``n_0`` is the nearest reference and ``S_k(x)`` the ``k`` nearest references (``n_0``
    included). Small values mean ``x`` is much closer to one reference than to the rest, i.e. a
    copy. ``l2`` is the RMS pixel difference (the ratio does not depend on that scaling).

    Differentiable w.r.t. ``x`` and ``refs``. ``k`` is capped at ``len(refs)``. References are
    processed ``chunk`` at a time, keeping only a running top-``k``, so memory is
    O(N * (chunk + k)). Returns ``(nl2 (N,), nearest index (N,))``.
    """
    if refs.shape[0] == 0:
        raise ValueError("nl2 needs at least one reference image")
    if x.shape[1:] != refs.shape[1:]:
        raise ValueError(f"shape mismatch: {tuple(x.shape[1:])} vs {tuple(refs.shape[1:])}")
    k = min(k, refs.shape[0])
    best_d: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    for j in range(0, refs.shape[0], chunk):
        d = _pairwise_rms(x, refs[j : j + chunk])
        idx = torch.arange(j, j + d.shape[1]).expand_as(d)
        if best_d is not None:
            d, idx = torch.cat([best_d, d], 1), torch.cat([best_i, idx], 1)
        best_d, pos = d.topk(min(k, d.shape[1]), dim=1, largest=False)
        best_i = idx.gather(1, pos)
    return best_d[:, 0] / (alpha * best_d.mean(1)), best_i[:, 0]


class PixelSpace:
    """The pixel-space "embedder": images downsampled to ``size x size``, compared by tiled L2.

    Same input convention as :class:`~diffmem.similarity.sscd.SSCD`: float ``(N, 3, H, W)`` in
    ``[-1, 1]`` or a list of ``(3, H, W)`` tensors. Lower scores are closer.
    """

    higher_is_better = False
    criterion = "tiled_l2"
    name = "pixel"

    def __init__(self, *, size: int = 64, grid: int = 4):
        if size % grid:
            raise ConfigError(f"pixel index size {size} must be divisible by grid {grid}")
        self.size = size
        self.grid = grid
        self.preprocessing = (f"rgb[-1,1]->resize{size}x{size}-bilinear-antialias;"
                              f"tiled_l2-grid{grid}")
        self.dim = 3 * size * size

    def embed(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        from diffmem.similarity.sscd import resize

        n = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
        if n == 0:
            return torch.zeros(0, 3, self.size, self.size)
        return resize(images, self.size)

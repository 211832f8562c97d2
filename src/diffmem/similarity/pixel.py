"""Pixel-space replication metrics.

Convention: images are float tensors ``(N, 3, H, W)`` in ``[-1, 1]`` (diffusers' VAE output range).
Use :func:`to_tensor` to convert uint8 arrays or PIL images.

- :func:`tiled_l2` -- Carlini et al. (2023), "Extracting Training Data from Diffusion Models", Sec. 4.1:
  split both images into a ``grid x grid`` array of tiles and take the *largest* per-tile distance,
  so that an image only counts as close when every region is close. Here the per-tile distance is
  the RMS difference, so values are comparable across resolutions (0 = identical, 2 = maximal).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_tensor(images: Sequence | np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` arrays or PIL images -> float ``(N, 3, H, W)`` in ``[-1, 1]``."""
    if isinstance(images, torch.Tensor):
        return images.float()
    if not isinstance(images, np.ndarray):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    if images.ndim == 3:
        images = images[None]
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


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
    ty = _tiles(y.float(), grid)  # (T, M, P)
    yy = ty.pow(2).sum(-1)  # (T, M)
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
    """For each image in ``x``, the tiled-L2 distance to its nearest image in ``refs`` and its index."""
    dists, idxs = [], []
    for i in range(0, x.shape[0], chunk):
        d = pairwise_tiled_l2(x[i : i + chunk], refs, grid=grid)
        v, j = d.min(1)
        dists.append(v)
        idxs.append(j)
    return torch.cat(dists), torch.cat(idxs)

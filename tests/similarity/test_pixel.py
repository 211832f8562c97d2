"""Pixel metrics against brute-force loop references; gradients reach the input image."""

from __future__ import annotations

import torch

from diffmem.similarity.pixel import nl2, pairwise_tiled_l2, tiled_l2


def _tiled_l2_loop(a: torch.Tensor, b: torch.Tensor, grid: int) -> float:
    """Carlini et al. tiled L2, written as plainly as possible: max over tiles of RMS diff."""
    _, h, w = a.shape
    th, tw = h // grid, w // grid
    worst = 0.0
    for r in range(grid):
        for c in range(grid):
            ta = a[:, r * th : (r + 1) * th, c * tw : (c + 1) * tw]
            tb = b[:, r * th : (r + 1) * th, c * tw : (c + 1) * tw]
            worst = max(worst, ((ta - tb) ** 2).mean().sqrt().item())
    return worst


def _nl2_loop(x: torch.Tensor, refs: torch.Tensor, k: int, alpha: float) -> tuple[float, int]:
    dists = sorted((((x - r) ** 2).mean().sqrt().item(), j) for j, r in enumerate(refs))
    top = dists[:k]
    return top[0][0] / (alpha * sum(d for d, _ in top) / len(top)), top[0][1]


def test_tiled_l2_matches_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    y = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    got = tiled_l2(x, y, grid=4)
    want = torch.tensor([_tiled_l2_loop(a, b, 4) for a, b in zip(x, y, strict=True)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    pair = pairwise_tiled_l2(x, y, grid=4)
    torch.testing.assert_close(pair.diagonal(), want, rtol=1e-4, atol=1e-5)


def test_nl2_matches_loop_and_chunking():
    g = torch.Generator().manual_seed(1)
    refs = torch.rand(40, 3, 8, 8, generator=g) * 2 - 1
    x = torch.cat([refs[:2] + 0.01 * torch.randn(2, 3, 8, 8, generator=g),
                   torch.rand(3, 3, 8, 8, generator=g) * 2 - 1])
    for k in (1, 5, 50):
        got, idx = nl2(x, refs, k=k, alpha=0.5, chunk=7)
        want = [_nl2_loop(xi, refs, k, 0.5) for xi in x]
        torch.testing.assert_close(got, torch.tensor([w[0] for w in want]), rtol=1e-4, atol=1e-5)
        assert idx.tolist() == [w[1] for w in want]
    near, _ = nl2(x, refs, k=10)
    assert (near[:2] < 0.2).all() and (near[2:] > 1.0).all()  # copies score low


def test_gradients_reach_input():
    g = torch.Generator().manual_seed(2)
    refs = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1
    x = refs[:2].clone().requires_grad_(True)  # exact copies: sqrt(0) must not give NaN
    tiled_l2(x, refs[2:4], grid=2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    x.grad = None
    val, _ = nl2(x, refs, k=3)
    val.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

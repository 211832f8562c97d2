"""The text-conditional noise magnitude and its gradient: one definition for detection,
explanation and mitigation.

Wen et al., ICLR 2024, "Detecting, Explaining, and Mitigating Memorization in Diffusion Models",
Sec. 3.1, eq. 4:

    d(x_t, c) = || eps(x_t, c) - eps(x_t, empty) ||_2

The norm is taken **per image** over all latent elements, with no guidance scale applied. (The
reference code of the mitigation, Sec. 3.4, takes one norm over the whole batch of 4 images, so its
target depends on the batch size; diffmem normalises per image everywhere.)
"""

from __future__ import annotations

import torch


def noise_magnitude(eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """d per image ``(N,)`` in float32 (eq. 4)."""
    return (eps_cond.float() - eps_uncond.float()).flatten(1).norm(dim=1)


def noise_magnitude_gradient(adapter, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                             eps_uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d of eq. 4 per image and its gradient w.r.t. the cond text embedding (Sec. 3.3).

    Returns ``(d, grad)`` with ``d`` of shape ``(N,)`` and ``grad`` like ``cond`` ``(N, L, D)``.
    Each image's d depends only on its own row of ``cond``, so one backward pass of ``sum(d)``
    gives every row's gradient. Costs one UNet call with gradients (``eps_uncond`` is given).
    """
    emb = cond.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        d = noise_magnitude(adapter.eps(x_t, t, emb), eps_uncond)
        (grad,) = torch.autograd.grad(d.sum(), emb)
    return d.detach(), grad

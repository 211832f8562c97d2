"""Guidance of the sampling loop: which conditioning branches a step evaluates and how their
predictions combine (classifier-free guidance by default; Ho & Salimans 2022, eq. 6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from diffmem.runtime.errors import ConfigError

if TYPE_CHECKING:
    from diffmem.core.sampling import Run, Step


@dataclass
class Branch:
    """One conditioning of the UNet at a step: embeddings for every prompt, evaluated for the
    prompts where ``mask`` is True (``None``: all)."""

    emb: torch.Tensor  # (B, L, D)
    mask: torch.Tensor | None = None  # (B,) bool

    def prompt_index(self, batch: int, device) -> torch.Tensor:
        if self.mask is None:
            return torch.arange(batch, device=device)
        return self.mask.nonzero().flatten().to(device)


class Guidance:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6), the default guidance of a run.

    :meth:`branches` names the conditionings to evaluate at a step; :meth:`combine` turns their
    outputs into the guided prediction. Per prompt: both branches evaluated -> CFG; only ``cond``
    -> ``eps_cond`` (guidance scale 1); only ``uncond`` -> ``eps_uncond`` (scale 0). Other branches
    are left to the hooks that added them. Subclass it for another guidance rule.
    """

    def branches(self, run: Run, step: Step) -> dict[str, Branch]:
        if not run.adapter.uses_uncond(step.guidance_scale):  # a DDPM without class guidance
            return {"cond": Branch(run.cond)}
        return {"uncond": Branch(run.uncond), "cond": Branch(run.cond)}

    def combine(self, run: Run, step: Step) -> torch.Tensor:
        u, c = step.out.get("uncond"), step.out.get("cond")
        if u is None or c is None:
            if u is None and c is None:
                raise ConfigError("a step evaluated neither the cond nor the uncond branch")
            return c if u is None else u
        eps = u + step.scale_like(c) * (c - u)
        has_u, has_c = step.evaluated("uncond"), step.evaluated("cond")
        rows = (slice(None),) + (None,) * (c.ndim - 1)
        if not bool(has_u.all()):
            eps = torch.where(has_u[rows], eps, c)
        if not bool(has_c.all()):
            eps = torch.where(has_c[rows], eps, u)
        return eps

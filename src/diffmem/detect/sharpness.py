"""Sharpness of the conditional score: a Hessian-vector product at the first step (Jeon, Kim, Lee
& Lee, ICML 2025, "Understanding and Mitigating Memorization in Generative Models via Sharpness of
Probability Landscapes", detection score; reference code Dongjae0324/sharpness_memorization_diffusion,
``local_model/pipe.py``, the ``exp_type == 'det'`` branch).

With the score s(x, c) = grad_x log p_t(x | c) = -eps(x, c) / sigma_t (sigma_t^2 = 1 - abar_t) and
its text-conditional part

    s_D(x)  = s(x, c) - s(x, empty) = -(eps(x, c) - eps(x, empty)) / sigma_t,
    H_D(x)  = d s_D / d x       (the difference of the two log-density Hessians)

the score of a prompt is the norm of the Hessian-vector product along s_D itself,

    score   = || H_D(x_t) s_D(x_t) ||_2  =  || J_D(x_t) D(x_t) ||_2 / sigma_t^2,
              D(x) = eps(x, c) - eps(x, empty),  J_D = dD/dx   (per image, all latent elements)

averaged over the selected steps (default the first, x_T: the paper's "steps = 1") and the
generations (default 4, the paper's n = 4 row; diffmem's default detector, chosen on the testbed's
broad set, docs/detection.md). Memorized prompts sit in sharp, steep regions of the conditional
density, so the product is large. For v-prediction models D is taken in eps units (eps =
sqrt(abar) v + sigma x: D = sqrt(abar) (v_c - v_u); the x terms cancel in the difference). The
reference writes the v-model score as (sqrt(abar) v - x) / sigma^2, which differs from this by a
per-step constant factor only.

The product J_D D is computed by forward-mode AD (``torch.func.jvp``, as the reference) through one
batched UNet call over [x, x] with [uncond, cond] embeddings; ``method="double_backward"`` computes
it with two reverse passes instead (for models whose ops lack forward-mode rules).

Cost per prompt and generation: the step's own cond + uncond evaluation (2 UNet calls, shared with
generation) plus one JVP through 2 more (a forward pass carrying tangents, about 2-3 calls' worth).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffmem.core.sampling import Run, Step
from diffmem.core.steps import StepSpec
from diffmem.detect.base import Detector
from diffmem.runtime.errors import ConfigError

METHODS = ("forward", "double_backward")


def jacobian_vector_product(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                            v: torch.Tensor, method: str = "forward") -> torch.Tensor:
    """``J_fn(x) v`` (same shape as ``fn(x)``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x, v = x.detach().float(), v.detach().float()
    # fused attention kernels have no forward-mode or double-backward rule; the math kernel has
    # both (the reference disables flash / memory-efficient attention for the same reason)
    if method == "forward":
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            _, out = torch.func.jvp(fn, (x,), (v,))
        return out.detach()
    if method == "double_backward":
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            xg = x.clone().requires_grad_(True)
            y = fn(xg)
            u = torch.zeros_like(y, requires_grad=True)
            (g,) = torch.autograd.grad(y, xg, u, create_graph=True)  # J^T u, linear in u
            (jv,) = torch.autograd.grad(g, u, v)
        return jv.detach()
    raise ConfigError(f"unknown jvp method {method!r}; choose one of {METHODS}")


class Sharpness(Detector):
    """Jeon et al.'s Hessian-vector-product score (higher = memorized).

    Example::

        det = Sharpness(steps=1, generations=4)
        scores = det.score("testbed", ["the gargoyle origami poster"])
    """

    name = "sharpness"

    def __init__(self, *, steps: StepSpec = 1, generations: int = 4, method: str = "forward",
                 **options) -> None:
        if method not in METHODS:
            raise ConfigError(f"unknown jvp method {method!r}; choose one of {METHODS}")
        self.method = method
        super().__init__(steps=steps, generations=generations, **options)

    def step_scores(self, run: Run, step: Step) -> torch.Tensor:
        adapter = run.adapter
        cond = step.branches["cond"].emb if "cond" in step.branches else run.cond
        uncond = step.branches["uncond"].emb if "uncond" in step.branches else run.uncond
        x = step.x_t.float()
        b = x.shape[0]
        emb = torch.cat([uncond, cond]).to(adapter.dtype)
        dtype = adapter.dtype

        def diff(z: torch.Tensor) -> torch.Tensor:
            out = adapter.eps(torch.cat([z, z]).to(dtype), step.t, emb).float()
            return out[b:] - out[:b]

        d = step.eps_cond.float() - step.eps_uncond.float()
        jd = jacobian_vector_product(diff, x, d, self.method)
        abar = adapter.abar(step.t).float()
        scale = abar if adapter.prediction_type == "v_prediction" else torch.ones_like(abar)
        # || H_D s_D || = c^2 || J_D D || / sigma^2 with c the v -> eps factor (1 for eps models)
        return jd.flatten(1).norm(dim=1) * scale / (1 - abar)

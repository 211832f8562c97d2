"""Anti-memorization guidance on pixel-space DDPMs (Chen, Liu & Xu, CVPR 2024, Sec. 3 and Fig. 4:
iDDPM on CIFAR-10, unconditional and class-conditional), the parts of
:class:`~diffmem.mitigate.amg.AntiMemorizationGuidance` that differ from text models.

x0 is the image (no decoder), so sigma_t is measured on the clean estimate itself against the
pixel index (tiled L2 mapped onto the SSCD scale, ``sigma = 0.7 - (4/3) d``; the paper uses a
normalised L2 on CIFAR-10). With s0 the run's guidance scale and ``1{.} = 1{sigma_t > lambda_t}``:

Unconditional model (no conditioning to lower or to steer away from; G_sim everywhere):

    eps <- eps + 1{.} G_sim,   G_sim = c3 sqrt(1 - abar_t) grad_{x_t} sigma_t,
                               c3 = 100 (sigma'_t - 0.3) exp((T - t) / 170)

Class-conditional model (class guidance: classifier-free guidance over the class label y with the
null class 0, the model's last class embedding):

    eps_hat = eps(x, 0) + s0 (eps(x, y) - eps(x, 0))
    eps     <- eps_hat + 1{.} (G_spe + G_dup + G_sim)
    G_spe   = -s1 (eps(x, y)   - eps(x, 0)),   s1 = clip(13 sigma_t, 0, s0 - f)
    G_dup   = -s2 (eps(x, y_N) - eps(x, 0)),   s2 = clip((s0 - f - s1) / 0.3 sigma_t, 0, s0 - f - s1)
    G_sim   as above

y_N is the class of the nearest training image n_0 when it is duplicated among the k nearest
items (copy-weighted, the text rule of G_dup with ``"class:N"`` as the caption). The floor f is
1 for text (s0 - s1 >= 1, the paper's clip) and 0 here: plain class-conditional sampling is s0 = 1
(``unet(x, t, class_labels=y)``), where the paper's clip would leave G_spe no room; with f = 0 G_spe
lowers the class guidance down to the null class alone (the unconditional model), and G_dup pushes
away from the neighbour's class by up to what is left.

The null-class prediction eps(x, 0) is not evaluated by a plain run at s0 = 1; AMG adds it (in the
step's one batched UNet call) for a prompt from the step after it first fires, so G_spe and G_dup
act from then on (as G_dup does for text models: from the step after its caption was found).
"""

from __future__ import annotations

import torch


def guidance_room(adapter, base: torch.Tensor) -> torch.Tensor:
    """s0 - f per prompt (``base``: s0), the most G_spe + G_dup may take; 0 for a model without
    guidance to lower (an unconditional DDPM)."""
    floor = adapter.guidance_floor
    if floor is None:
        return torch.zeros_like(base)
    return (base - floor).clamp_min(0)


def needs_null_branch(adapter) -> bool:
    """Whether AMG must add the null-class branch itself (a DDPM that guides only at s0 != 1)."""
    return not adapter.text_conditioned and adapter.guidance_floor is not None


def add_null_branch(run, step, prompts: torch.Tensor) -> None:
    """Evaluate the null class for ``prompts`` ((B,) bool) at this step, when the run does not."""
    if "uncond" in step.branches or not bool(prompts.any()):
        return
    step.add_branch("uncond", run.uncond, prompts)

"""The denoising training step shared by ``diffmem train`` and the testbed trainer.

Notation (Ho et al. 2020, DDPM, Sec. 3.2, eq. 14; v-prediction: Salimans & Ho 2022, Sec. 4):

    a_t         = alphas_cumprod[t]                          (the scheduler's training schedule)
    x_t         = sqrt(a_t) x_0 + sqrt(1 - a_t) eps,         eps ~ N(0, I), t ~ U{0, ..., T-1}
    target      = eps                                         (prediction_type "epsilon")
                = sqrt(a_t) eps - sqrt(1 - a_t) x_0           ("v_prediction")
                = x_0                                         ("sample")
    L_i         = mean over elements of (f(x_t, t, c_i) - target_i)^2       per sample i
    L           = mean of L_i over the samples a loss filter keeps

With no filter (or every sample kept) ``L`` is ``F.mse_loss`` over the whole batch, exactly the
loss the testbed trainer used before this module existed. Loss filters
(:mod:`diffmem.train.filters`) see the step's prediction (detached) and may drop samples; a step
whose samples are all dropped has zero loss (the optimizer still steps: weight decay and momentum
act, as in the reference code of Wen et al., where the masked mean is taken the same way).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def draw_noise(lat_mean: torch.Tensor, lat_std: torch.Tensor, gen: torch.Generator,
               num_train_timesteps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x_0`` sampled from the VAE posteriors (scaled means and stds of the batch's images), the
    noise and the timesteps, drawn in this order from ``gen`` (on the CPU, so a run is the same on
    any device)."""
    z0 = lat_mean + lat_std * torch.randn(lat_mean.shape, generator=gen)
    noise = torch.randn(z0.shape, generator=gen)
    t = torch.randint(0, num_train_timesteps, (z0.shape[0],), generator=gen)
    return z0, noise, t


@dataclass
class StepOutput:
    """What one step computed: the loss to back-propagate and per-sample diagnostics."""

    loss: torch.Tensor
    per_sample: torch.Tensor  # (B,) detached L_i
    keep: torch.Tensor  # (B,) bool, samples in the loss
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # filter name -> (B,) score
    drops: dict[str, torch.Tensor] = field(default_factory=dict)  # filter name -> (B,) dropped


class DiffusionStep:
    """Noising, the UNet's prediction, the loss and the loss filters of one training step.

    Args:
        scheduler: the pipeline's scheduler (its ``alphas_cumprod``, ``prediction_type`` and
            ``num_train_timesteps`` define the forward process).
        filters: :class:`~diffmem.train.filters.LossFilter` objects; each may drop samples.
        embedding_noise: Somepalli et al.'s GN, ``lambda`` of ``c <- c + lambda * N(0, I)``
            added to the text embedding of every sample (0: off), noise drawn from the step's
            generator after the timesteps.
    """

    def __init__(self, scheduler, *, filters: Sequence = (), embedding_noise: float = 0.0):
        self.alphas = scheduler.alphas_cumprod.float()
        self.prediction_type = scheduler.config.prediction_type
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            from diffmem.runtime.errors import ConfigError

            raise ConfigError(f"unsupported prediction_type {self.prediction_type!r}")
        self.filters = list(filters)
        self.embedding_noise = float(embedding_noise)

    def noisy(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas.to(z0.device)[t].view(-1, 1, 1, 1)
        return a.sqrt() * z0 + (1 - a).sqrt() * noise

    def target(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return z0
        a = self.alphas.to(z0.device)[t].view(-1, 1, 1, 1)
        return a.sqrt() * noise - (1 - a).sqrt() * z0

    def eps_from_prediction(self, pred: torch.Tensor, x_t: torch.Tensor,
                            t: torch.Tensor) -> torch.Tensor:
        """The noise estimate of a prediction of any type (for the magnitude filter)."""
        if self.prediction_type == "epsilon":
            return pred
        a = self.alphas.to(x_t.device)[t].view(-1, 1, 1, 1)
        if self.prediction_type == "v_prediction":  # eps = sqrt(a) v + sqrt(1 - a) x_t
            return a.sqrt() * pred + (1 - a).sqrt() * x_t
        return (x_t - a.sqrt() * pred) / (1 - a).sqrt()  # from x_0

    def __call__(self, unet, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                 emb: torch.Tensor, *, gen: torch.Generator | None = None,
                 context: dict | None = None) -> StepOutput:
        """The loss of one batch. ``emb``: the text embeddings ``(B, L, D)``; ``context``: what
        filters need besides (``unet`` unwrapped, ``uncond`` embedding, ...)."""
        if self.embedding_noise:
            z = torch.randn(emb.shape, generator=gen) if gen is not None else torch.randn_like(emb)
            emb = emb + self.embedding_noise * z.to(emb)
        x_t = self.noisy(z0, noise, t)
        ctx = dict(context or {})
        captures = [f.capture(unet, ctx) for f in self.filters if hasattr(f, "capture")]
        try:
            for c in captures:
                c.__enter__()
            pred = unet(x_t, t, encoder_hidden_states=emb).sample
        finally:
            for c in reversed(captures):
                c.__exit__(None, None, None)
        target = self.target(z0, noise, t)
        per_sample = (pred.detach().float() - target.float()).pow(2).flatten(1).mean(1)
        keep = torch.ones(z0.shape[0], dtype=torch.bool, device=z0.device)
        scores: dict[str, torch.Tensor] = {}
        drops: dict[str, torch.Tensor] = {}
        for f in self.filters:
            drop, score = f(self, x_t=x_t, t=t, emb=emb, pred=pred.detach(), loss=per_sample,
                            **ctx)
            keep &= ~drop.to(keep.device)
            scores[f.name] = score.detach().float().cpu()
            drops[f.name] = drop.detach().cpu()
        if bool(keep.all()):
            loss = F.mse_loss(pred.float(), target.float())
        elif bool(keep.any()):
            err = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
            loss = err[keep].mean()
        else:
            loss = pred.sum() * 0.0
        return StepOutput(loss, per_sample.cpu(), keep.cpu(), scores, drops)


def optimizer_step(accelerator, loss: torch.Tensor, optimizer, params, *,
                   max_grad_norm: float | None = 1.0) -> None:
    """zero_grad, backward (through ``accelerator``), gradient clipping, optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    if max_grad_norm:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()

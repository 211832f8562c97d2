"""The hook interface of the sampling loop (:func:`diffmem.core.sampling.sample`): what a detector
observes and what a guidance term or mitigation may change, at each step (docs/core.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffmem.core.sampling import Run, Step


class Hook:
    """Base class of everything that plugs into :func:`sample`. Override what you need.

    Attributes:
        name: key under which :func:`sample` returns what the hook stored in ``run.records``.
        attention_layers: ``None`` (no attention access), ``"all"``, or cross-attention layer names
            or patterns (``"down_blocks.1*"``); see :func:`diffmem.core.attention.select_layers`.
            Override :meth:`layers` to choose them per model.

    A hook keeps whatever it accumulates during a run in ``run.state(self)`` (a namespace made for
    this hook and this run), so that one hook object can serve several runs at once.
    """

    name: str = "hook"
    attention_layers: Sequence[str] | str | None = None

    def layers(self, run: Run) -> Sequence[str] | str | None:
        """Cross-attention layers this hook needs in ``run`` (default :attr:`attention_layers`)."""
        return self.attention_layers

    def on_start(self, run: Run) -> None:
        """Before the first step: may change ``run.cond``, ``run.uncond`` or ``run.latents``."""

    def before_step(self, run: Run, step: Step) -> None:
        """Before the UNet call: may change ``run.latents``, the branches or the guidance scale."""

    def on_step(self, run: Run, step: Step) -> None:
        """After the UNet call: may read the step, change ``step.eps`` / set ``run.stop``."""

    def on_end(self, run: Run) -> None:
        """After the last step (also after an early stop)."""

    def last_step(self, run: Run) -> int | None:
        """Index of the last step this hook needs; ``None``: it needs the whole run. With
        ``sample(..., stop_when_done=True)`` the run ends once every hook has what it needs."""
        return None

    def attention_at(self, run: Run, step: Step) -> bool:
        """Whether this hook needs the cross-attention at this step (only asked if it has layers)."""
        return True

    def attention_logits(self, run: Run, step: Step, layer: str,
                         scores: torch.Tensor) -> torch.Tensor:
        """Change cross-attention logits ``(N, heads, queries, tokens)`` of the UNet batch; find a
        branch's rows with :meth:`Step.rows` (e.g. ``scores[step.rows("cond")]``)."""
        return scores

    def attention_rows(self, run: Run, step: Step) -> torch.Tensor | None:
        """UNet-batch rows whose logits :meth:`attention_logits` may change at this step; ``None``
        (default): any row. A hook that only changes logits and declares its rows lets the other
        rows go through the layer's original processor, so they stay bit-identical to a run
        without it (e.g. the prompts a gate did not flag)."""
        return None

    def on_attention(self, run: Run, step: Step, layer: str, probs: torch.Tensor) -> None:
        """Observe cross-attention probabilities ``(N, heads, queries, tokens)`` (float32) of the
        UNet batch; :meth:`Step.branch` gives one branch's rows in prompt order."""


class SetInputs(Hook):
    """Generate from given text embeddings (and, optionally, a given x_T) instead of the encoded
    prompts: ``on_start`` replaces ``run.cond`` with ``cond`` (``(B, L, D)``, one row per prompt of
    the run) and, when ``latents`` is given, ``run.latents`` with ``latents`` (unit-variance x_T,
    scaled by the scheduler's ``init_noise_sigma``). Put it first among a run's hooks, so that the
    others (mitigations, detectors) see the replaced inputs. Used by the recovery check
    (:mod:`diffmem.eval.recovery`), whose embeddings come from an optimisation, not a prompt."""

    name = "set_inputs"

    def __init__(self, cond: torch.Tensor | None, latents: torch.Tensor | None = None) -> None:
        self.cond, self.latents = cond, latents

    def on_start(self, run: Run) -> None:
        for given in (self.cond, self.latents):
            if given is not None and given.shape[0] != run.batch_size:
                raise ValueError(f"SetInputs: {given.shape[0]} rows for {run.batch_size} prompts")
        if self.cond is not None:
            run.cond = self.cond.to(run.cond.device, run.cond.dtype)
        if self.latents is not None:
            sigma = run.scheduler.init_noise_sigma
            run.latents = (self.latents.to(run.latents.device, run.latents.dtype) * sigma)

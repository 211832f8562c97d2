"""The hook interface of the sampling loop (:func:`diffmem.core.sampling.sample`): what a detector
observes and what a guidance term or mitigation may change, at each step (docs/core.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffmem.core.sampling import Run, Step


@dataclass(frozen=True)
class KeyEdit:
    """A change of cross-attention that acts on the keys only, per UNet-batch row.

    ``rows`` ``(n,)``: the UNet-batch rows it changes (the others are left alone, bit for bit);
    ``scale`` ``(n, tokens)`` or None: key ``j`` of row ``rows[i]`` is multiplied by
    ``scale[i, j]``, which multiplies its logit ``Q K_j^T / sqrt(d)`` by the same factor, for every
    head and query (the logit is linear in the key); ``mask`` ``(n, tokens)`` bool or None: True
    hides the key (logit -inf, applied after the scaling). Scales must be finite and > 0.

    Expressed this way, a change needs no explicit attention matrix: the layer scales the key rows
    and passes the mask as an additive float mask to fused attention
    (``torch.nn.functional.scaled_dot_product_attention``); where the probabilities are needed
    anyway (an observer on the layer) :meth:`apply` makes the same change to the logits.
    """

    rows: torch.Tensor
    scale: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        """The same change on logits ``(N, heads, queries, tokens)`` (a changed copy)."""
        scores = scores.clone()
        if not len(self.rows):
            return scores
        r = self.rows.to(scores.device)
        if self.scale is not None:
            scores[r] = scores[r] * self.scale.to(scores)[:, None, None, :]
        if self.mask is not None:
            hidden = self.mask.to(scores.device)[:, None, None, :]
            scores[r] = scores[r].masked_fill(hidden, float("-inf"))
        return scores

    @staticmethod
    def combine(edits: Sequence[KeyEdit], n_keys: int) -> KeyEdit:
        """One edit doing all of ``edits`` (rows: their union, sorted; scales multiplied; masks
        or-ed; the keys of a row that an edit does not list are left as they are by it)."""
        rows = torch.unique(torch.cat([e.rows.cpu().long() for e in edits]))
        if len(edits) == 1 and torch.equal(rows, edits[0].rows.cpu()):
            return edits[0]
        scale = mask = None
        for e in edits:
            pos = torch.searchsorted(rows, e.rows.cpu().long())
            if e.scale is not None:
                if scale is None:
                    scale = torch.ones(len(rows), n_keys, dtype=e.scale.dtype,
                                       device=e.scale.device)
                scale[pos.to(scale.device)] *= e.scale.to(scale)
            if e.mask is not None:
                if mask is None:
                    mask = torch.zeros(len(rows), n_keys, dtype=torch.bool, device=e.mask.device)
                mask[pos.to(mask.device)] |= e.mask.to(mask.device)
        return KeyEdit(rows, scale, mask)


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

    def attention_keys(self, run: Run, step: Step, layer: str, n_keys: int) -> KeyEdit | None:
        """The whole change this hook makes to the layer's cross-attention at this step, when it
        can be said on the keys (a :class:`KeyEdit`: key scales and a key mask per row, over
        ``n_keys`` keys); ``None`` (default): it changes logits through :meth:`attention_logits`.
        When every hook on a layer answers with a :class:`KeyEdit` and none observes, the layer
        runs fused attention (no attention matrix); otherwise :meth:`KeyEdit.apply` is used on the
        explicit logits in place of :meth:`attention_logits`."""
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

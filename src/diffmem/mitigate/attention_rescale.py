"""Cross-attention rescaling of the BOS token (Ren et al., ECCV 2024, inference-time mitigation).

Ren, Li, Xu, ... Tang, "Unveiling and Mitigating Memorization in Text-to-image Diffusion Models
through Cross Attention" (ECCV 2024). Memorized prompts concentrate their cross-attention on a few
token embeddings instead of the beginning token, which normally collects most of the attention.
The mitigation raises the weight of the BOS token again by rescaling its pre-softmax logit, in the
conditional branch, at every cross-attention layer and step:

    S = Q K^T / sqrt(d)                       (N, heads, queries, tokens)
    S[cond rows, :, :, BOS] <- c * S[cond rows, :, :, BOS]
    S[rows, :, :, j] <- -inf   for j >= L_prompt  (optional key mask; L_prompt = BOS + prompt + EOS)
    A = softmax(S)

Reference code (``renjie3/MemAttn`` @ c66efd2, ``refactored_attention_processor.py``
``my_simple_scaled_dot_product_attention``, script ``local_cmd_inference_time_mitigation.sh``):
``--c1 1.25 --cross_attn_mask --miti_mem``: c = 1.25 (MemBench uses 1.1), multiplied into the logit
after the 1/sqrt(d) scaling; all 50 steps; all 16 cross-attention layers; the key mask on, keeping
BOS, the prompt's tokens and the first EOS (``--mask_length_minis1`` masks the EOS too), applied to
*both* halves of the CFG batch with the conditional prompt's length.

Traps of the reference, fixed here:

- the BOS rescaling indexes batch rows ``[1::2]``, which are the conditional rows only for one image
  per prompt (diffusers lays the batch out as ``[uncond x n, cond x n]``); here the rows come from
  the step's layout (:meth:`~diffmem.core.sampling.Step.rows`), right for any batch, any number of
  images per prompt and steps with extra branches;
- the key mask hard-codes 8 heads and 77 tokens and one prompt length per batch; here it is per
  prompt (``run.tokens.lengths``) and broadcast over the layer's own heads;
- ``cuda`` is hard-coded; nothing here assumes a device.

SDXL: the keys are the 77 token rows, each holding both text encoders' features (the adapter
unpacks the conditioning before the UNet); the pooled embedding enters through the time embedding,
is no key and is left alone. BOS, the mask and the rows are those of SD 1.x
(``tests/models/test_sdxl_methods.py``).

Strength ``s`` maps to ``c = 1 + s (c_ref - 1)`` (0: c = 1; 1: the reference). The key mask is on
for every ``s > 0`` (it has no continuous strength). At ``s = 0`` the hook asks for no attention at
all, so the fused processors run and the run is the plain run bit for bit. Only the rows of
targeted prompts change (:meth:`attention_rows`): with a gate, unflagged prompts keep the original
processors' output and stay bit-identical; flagged prompts are rescaled from step 0 on (the gate
decides after step 0's UNet call, so step 0 is re-evaluated for them,
:meth:`~diffmem.core.sampling.Step.recompute`).

Fused attention: the change is stated on the keys (:meth:`attention_keys`, a
:class:`~diffmem.core.hooks.KeyEdit`): ``c S_bos = Q (c K_bos)^T / sqrt(d)``, so the BOS key row of
each targeted cond row is multiplied by ``c``, and the key mask is an additive mask (-inf after the
prompt, 0 elsewhere) broadcast over heads and queries; the layer runs
``scaled_dot_product_attention`` and forms no attention matrix. Where the probabilities are needed
anyway (an observer such as attention-entropy detection on the same layers, or a hook that changes
logits) the layer goes explicit and the same change is made on the logits; ``fused=False`` forces
that path (results agree to float rounding: max 2.8e-6 over the testbed's images).

Cost (``bench/bench_ren_fused.py``, shipped testbed, 8 prompts x 50 DDIM steps, one thread, CPU
shared with other jobs): fused 0.95-1.04x plain generation (plain within noise); explicit
1.08-1.21x; before the fused path (explicit matrix plus the original processor for every row)
1.37-1.42x. No extra UNet call without a gate; one for the flagged prompts with one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from diffmem.core.hooks import KeyEdit
from diffmem.core.sampling import Run, Step
from diffmem.core.steps import StepSpec, check_steps, select_steps
from diffmem.mitigate.base import FirstStepGate, Mitigation
from diffmem.runtime.errors import ConfigError


class AttentionRescale(Mitigation):
    """Ren et al. 2024: multiply the BOS token's cross-attention logit by ``c`` in the cond rows.

    Parameters:
        strength: ``c = 1 + strength * (c - 1)``; 0 is the plain run.
        gate: optional :class:`~diffmem.mitigate.base.FirstStepGate`.
        c: the reference factor (1.25, the authors' script; MemBench uses 1.1).
        mask: mask the key positions after the prompt (reference ``--cross_attn_mask``: on).
        mask_eos: mask the first EOS too (reference ``--mask_length_minis1``: off).
        mask_uncond: mask the same positions in the unconditional rows (the reference masks both
            CFG halves with the conditional prompt's length: on).
        steps: the steps to rescale (:mod:`diffmem.core.steps`; reference: all).
        layers: cross-attention layers (names or patterns; reference: all).
        fused: run the change through fused attention (the BOS key scaled, the key mask additive;
            default); False: through an explicit attention matrix (same result up to rounding,
            slower; for comparisons).
    """

    name = "ren"

    def __init__(self, strength: float = 1.0, *, gate: FirstStepGate | None = None,
                 c: float = 1.25, mask: bool = True, mask_eos: bool = False,
                 mask_uncond: bool = True, steps: StepSpec = "all",
                 layers: Sequence[str] | str = "all", fused: bool = True) -> None:
        super().__init__(strength, gate=gate)
        if not math.isfinite(c) or c <= 0:
            raise ConfigError(f"ren: c must be a finite number > 0, got {c}")
        self.c_ref = float(c)
        self.c = 1.0 + self.strength * (self.c_ref - 1.0)
        self.mask = bool(mask)
        self.mask_eos = bool(mask_eos)
        self.mask_uncond = bool(mask_uncond)
        self.steps = check_steps(steps)
        self.attention_layers = layers
        self.fused = bool(fused)

    # ------------------------------------------------------------------ which rows, steps, layers
    def layers(self, run: Run):
        return None if self.strength == 0 else self.attention_layers

    def _branches(self) -> tuple[str, ...]:
        return ("cond", "uncond") if self.mask and self.mask_uncond else ("cond",)

    def on_start(self, run: Run) -> None:
        st = run.state(self)
        st.steps = set(select_steps(self.steps, len(run.timesteps)))

    def attention_at(self, run: Run, step: Step) -> bool:
        targets = self.targets(run)
        return (step.index in run.state(self).steps and targets is not None
                and bool(targets.any()))

    def _rows(self, run: Run, step: Step, branch: str) -> tuple[torch.Tensor, torch.Tensor]:
        """UNet-batch rows of ``branch`` that belong to targeted prompts, and those prompts."""
        if branch not in step.layout:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty
        rows, prompts = step.layout[branch]
        hit = self.targets(run)[prompts]
        return rows[hit], prompts[hit]

    def attention_rows(self, run: Run, step: Step) -> torch.Tensor:
        return torch.cat([self._rows(run, step, b)[0] for b in self._branches()])

    # ------------------------------------------------------------------ the rescaling
    def _edit(self, run: Run, step: Step, n_keys: int) -> KeyEdit:
        """The change as key scales and a key mask per targeted row (rows sorted), once per UNet
        call (every layer of the call asks for it)."""
        st = run.state(self)
        cached = getattr(st, "edit", None)
        if cached is not None and cached[0] is step and cached[1] is step.layout \
                and cached[2] == n_keys:
            return cached[3]
        rows, prompts, is_cond = [], [], []
        for branch in self._branches():
            r, p = self._rows(run, step, branch)
            rows.append(r)
            prompts.append(p)
            is_cond.append(torch.full((len(r),), branch == "cond"))
        order = torch.argsort(torch.cat(rows))
        rows, prompts = torch.cat(rows)[order], torch.cat(prompts)[order]
        is_cond = torch.cat(is_cond)[order]
        scale = torch.ones(len(rows), n_keys)
        scale[is_cond, run.adapter.bos_index] = self.c
        mask = None
        if self.mask:
            keep = run.tokens.lengths.cpu()[prompts] - (1 if self.mask_eos else 0)
            mask = torch.arange(n_keys)[None, :] >= keep[:, None]  # (rows, tokens)
            mask = mask.to(run.adapter.device)
        edit = KeyEdit(rows, scale.to(run.adapter.device), mask)
        st.edit = (step, step.layout, n_keys, edit)
        return edit

    def attention_keys(self, run: Run, step: Step, layer: str, n_keys: int) -> KeyEdit | None:
        """BOS key x c in the targeted cond rows, keys after the prompt masked: fused attention
        (``fused=False``: None, the change goes through :meth:`attention_logits`)."""
        return self._edit(run, step, n_keys) if self.fused else None

    def attention_logits(self, run: Run, step: Step, layer: str,
                         scores: torch.Tensor) -> torch.Tensor:
        return self._edit(run, step, scores.shape[-1]).apply(scores)

    # ------------------------------------------------------------------ gate: apply from step 0
    def on_step(self, run: Run, step: Step) -> None:
        flagged = self.flagged_now(run, step)
        if flagged is None or 0 not in run.state(self).steps:
            return
        embeddings = {"cond": run.cond}
        if self.mask and self.mask_uncond and "uncond" in step.out:
            embeddings = {"uncond": run.uncond, "cond": run.cond}
        step.recompute(flagged, embeddings)

    def on_end(self, run: Run) -> None:
        targets = self.targets(run)
        if targets is not None:
            for i, hit in enumerate(targets.tolist()):
                if hit:
                    self.report(run, i, c=self.c, masked=self.mask,
                                steps=len(run.state(self).steps))
        super().on_end(run)

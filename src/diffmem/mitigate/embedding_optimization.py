"""Prompt-embedding optimisation at the first step (Wen et al., ICLR 2024, Sec. 3.4).

Wen, Liu, Chen, Lyu: "Detecting, Explaining, and Mitigating Memorization in Diffusion Models",
https://openreview.net/forum?id=84n3UwkH7b. Memorized prompts have a large text-conditional noise
magnitude (Sec. 3.1, eq. 4)

    d(x_T, e) = || eps(x_T, e) - eps(x_T, e_empty) ||_2

already at the first step. The inference-time mitigation minimises it over the conditional text
embedding ``e`` (the text encoder's output, L x D) on the run's own initial noise x_T, stopping
once ``d <= target``, and then generates from the same x_T with the optimised embedding for all
steps (the unconditional branch is untouched).

Reference code (``YuxinWenRick/diffusion_memorization``, ``local_sd_pipeline.py`` ``aug_prompt``,
settings of ``inference_mem.py``): AdamW (PyTorch defaults, weight decay 0.01), lr 0.05, at most 10
iterations; each iteration evaluates d, stops when ``d <= target_loss`` (checked before the update),
else takes one step; the gradient of the BOS position is zeroed, every other position (padding
included) moves. These are the defaults here.

Differences and traps, and what this module does:

- The reference takes ONE norm over the whole batch of images of a prompt (4 by default, target 3),
  so the target depends on the batch size. Here d is per image (:mod:`diffmem.core.magnitude`) and
  every batch row (each image of each prompt) has its own embedding, optimised and stopped
  independently: once a row is under the target its embedding stops moving.
- The default target is the detector's calibrated first-step threshold
  (:meth:`~diffmem.mitigate.registry.MitigationContext.require_threshold`) divided by the
  strength: the optimisation stops once a prompt would no longer be flagged.
- AdamW's decoupled weight decay shrinks every entry, including the BOS row whose gradient the
  reference zeroes (by ``1 - lr * wd`` per step); here the BOS row is kept exactly.
- The unconditional prediction at x_T does not depend on the embedding: it is computed once (the
  reference re-evaluates it every iteration).
- SDXL (two encoders, a pooled embedding): the parameters are the token rows, each holding both
  encoders' features (BOS fixed as above), and the pooled embedding as a separate parameter
  (``pooled=False`` keeps it fixed), both taken apart and put back by the adapter
  (``split_pooled`` / ``join_pooled``), so the packed pooled row is never treated as a token. The
  SDXL pipeline takes both as the prompt's embedding (``prompt_embeds``,
  ``pooled_prompt_embeds``); d depends on both.
- The optimisation's own UNet calls are not seen by attention hooks (e.g. an attention rescaling
  mitigation does not apply to them); generation afterwards is an ordinary run.

Strength ``s``: target = target(1) / s, with target(1) the calibrated threshold; the iteration cap
stays at the reference's 10. ``s = 0`` changes nothing (bit-identical to plain generation), larger
``s`` pushes d further below the threshold.

Gate: without one, the embeddings are optimised in ``on_start`` (one no-grad UNet call for the
unconditional prediction at x_T, then one UNet call with gradients per iteration for the rows not
yet under the target). With a :class:`~diffmem.mitigate.base.FirstStepGate`, the flagged rows are
optimised at step 0 (the step's own unconditional prediction is reused) and that step is
re-evaluated for them (:meth:`~diffmem.core.sampling.Step.recompute`); unflagged prompts keep the
plain generation bit for bit.

Report per prompt (``run.records["mitigation.wen"]``): ``magnitude_before``, ``magnitude_after``
(d at the first step of the mitigated run), ``iterations`` (updates taken), ``target``,
``reached``.
"""

from __future__ import annotations

import math

import torch

from diffmem.core.magnitude import noise_magnitude
from diffmem.core.sampling import Run, Step
from diffmem.mitigate.base import FirstStepGate, MagnitudeTarget
from diffmem.runtime.errors import ConfigError


class EmbeddingOptimization(MagnitudeTarget):
    """Wen et al. 2024 Sec. 3.4: lower the first-step noise magnitude by optimising the
    conditional text embedding on the run's own x_T.

    Parameters:
        strength: target = ``target / strength``; 0 leaves the run unchanged.
        gate: optional :class:`FirstStepGate`.
        target: d at strength 1 (per image); default the gate's threshold. Built from the
            registry (``from_context``) it is the calibrated detector threshold.
        lr: AdamW learning rate (reference 0.05).
        max_iterations: at most this many updates (reference 10).
        weight_decay: AdamW's decoupled weight decay (PyTorch default 0.01, as the reference).
        pooled: for a family with a pooled text embedding (SDXL), optimise it together with the
            token rows (default); False keeps it as encoded. No effect on SD 1.x/2.x.
    """

    name = "wen"

    def __init__(self, strength: float = 1.0, *, gate: FirstStepGate | None = None,
                 target: float | None = None, lr: float = 0.05, max_iterations: int = 10,
                 weight_decay: float = 0.01, pooled: bool = True) -> None:
        super().__init__(strength, gate=gate, target=target)
        self.pooled = bool(pooled)
        if not (lr > 0 and math.isfinite(lr)):
            raise ConfigError(f"wen: lr must be > 0, got {lr}")
        if int(max_iterations) != max_iterations or max_iterations < 0:
            raise ConfigError(f"wen: max_iterations must be an integer >= 0, got {max_iterations}")
        self.lr = float(lr)
        self.max_iterations = int(max_iterations)
        self.weight_decay = float(weight_decay)

    # ---------------------------------------------------------------- hook
    def on_start(self, run: Run) -> None:
        st = run.state(self)
        st.rows = torch.zeros(run.batch_size, dtype=torch.bool)
        st.before = None
        if self.gate is not None or self.strength == 0:
            return
        rows = self.targets(run)
        t = run.timesteps[0]
        x_in = run.scheduler.scale_model_input(run.latents, t)
        idx = rows.nonzero().flatten().to(run.latents.device)
        with torch.no_grad():
            eps_u = run.adapter.eps(x_in[idx], t, run.uncond[idx])
        self._optimise(run, rows, x_in[idx], t, eps_u)

    def on_step(self, run: Run, step: Step) -> None:
        if step.index != 0 or self.strength == 0:
            return
        rows = self.flagged_now(run, step)
        if self.gate is not None:
            if rows is None:
                return
            idx = rows.nonzero().flatten().to(step.x_t.device)
            self._optimise(run, rows, step.x_t[idx], step.t, step.eps_uncond[idx])
            step.recompute(rows, {"cond": run.cond})
        self.report_first_step(run, step)

    # ---------------------------------------------------------------- optimisation
    def _optimise(self, run: Run, rows: torch.Tensor, x_in: torch.Tensor, t: torch.Tensor,
                  eps_u: torch.Tensor) -> None:
        """Optimise ``run.cond[rows]`` on the model inputs ``x_in`` (one per row) and write it back."""
        st = run.state(self)
        st.rows = rows.clone()
        idx = rows.nonzero().flatten()
        if len(idx) == 0:
            return
        adapter = run.adapter
        target = self.effective_target
        bos = adapter.bos_index
        start = run.cond[idx.to(run.cond.device)].detach()
        # the token rows (and, SDXL, the pooled embedding) are the parameters, never the packed row
        start_tokens, start_pooled = adapter.split_pooled(start)
        emb = start_tokens.float().clone().requires_grad_(True)
        params = [emb]
        pooled = start_pooled
        if start_pooled is not None and self.pooled:
            pooled = start_pooled.float().clone().requires_grad_(True)
            params.append(pooled)

        def joined(rows):  # conditioning of ``rows`` in the run's dtype
            p = None if pooled is None else pooled[rows].to(start.dtype)
            return adapter.join_pooled(emb[rows].to(start.dtype), p)

        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        n = len(idx)
        done = torch.zeros(n, dtype=torch.bool)
        iters = torch.zeros(n, dtype=torch.long)
        before = torch.full((n,), float("nan"))  # d at the first iteration (all rows active)
        x_in, eps_u = x_in.detach(), eps_u.detach()
        for it in range(self.max_iterations):
            active = (~done).nonzero().flatten()
            a = active.to(emb.device)
            with torch.enable_grad():
                d = noise_magnitude(adapter.eps(x_in[a], t, joined(a)), eps_u[a])
                d_cpu = d.detach().cpu()
                if it == 0:
                    before = d_cpu.clone()
                hit = d_cpu <= target
                done[active[hit]] = True
                if bool(done.all()):
                    break
                keep = (~hit).float().to(d.device)
                grads = torch.autograd.grad((d * keep).sum(), params)
            grads[0][:, bos] = 0
            frozen = [p.detach().clone() for p in params]
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                still = done.to(emb.device)
                for p, f in zip(params, frozen, strict=True):
                    p[still] = f[still]  # rows under the target stop moving
                emb[:, bos] = start_tokens[:, bos].float()  # BOS fixed (weight decay included)
            iters[~done] += 1
        if self.max_iterations == 0:
            with torch.no_grad():
                before = noise_magnitude(adapter.eps(x_in, t, start), eps_u).cpu()
        cond = run.cond.clone()
        with torch.no_grad():
            cond[idx.to(cond.device)] = joined(slice(None)).detach().to(cond.dtype)
        run.cond = cond
        for k, i in enumerate(idx.tolist()):
            self.report(run, i, magnitude_before=float(before[k]), iterations=int(iters[k]),
                        target=target)

"""Initial-noise optimisation: move x_T until the first-step noise magnitude is low.

Memorized generations start from a region of x_T where the text-conditional noise magnitude
d(x_T) = || eps(x_T, c) - eps(x_T, empty) ||_2 (Wen et al. 2024, eq. 4) is large; moving x_T out
of it lets the prompt's guidance act on a "flat" start (both papers below). Two variants:

``method="sail"`` (default) - SAIL, Jeon et al., "Understanding and Mitigating Memorization in
Generative Models via Sharpness of Probability Landscapes", ICML 2025 (arXiv 2412.04140,
Algorithm 2; reference code
``Dongjae0324/sharpness_memorization_diffusion``, ``local_model/pipe.py``). Loss per image, with
d evaluated at a perturbed point as a proxy of the sharpness (Hessian-vector product) at x_T::

    L(x_T) = || d(x_T + d(x_T) / ||d(x_T)||) || + lambda * || x_T ||

Adam, lr 0.05, at most 10 steps, lambda = 0.05 (0.01 for SD 2, here: for v-prediction models);
the Gaussianity term keeps ||x_T|| from drifting. Two UNet calls (cond + uncond each) per iteration,
differentiated through both (the unit direction is not detached, as in the reference).

``method="han"`` - Han et al., NeurIPS 2025 (``hygnhan/init_noise_diffusion_memorization``,
``local_sd_pipeline.py`` ``adj_init_noise_per_sample``), per-sample variant::

    L(x_T) = || d(x_T) ||

AdamW (weight decay 0.01), lr 0.01, at most 1000 iterations in the reference (``--optim_iters``)
with early stop at ``--target_loss`` 0.9; one UNet call (cond + uncond) per iteration. The cap is
the reference's: on a model where the target is far this is slow; pass ``max_iterations``.

What this module does the same for both, and where it departs from the references:

- Per image, on the run's OWN x_T (each image of each prompt optimised and stopped on its own),
  so the seed still determines the result. SAIL instead draws 8 fresh candidate latents from a
  seed and keeps the first ones under its threshold, retrying with new seeds and a raised
  threshold (+0.1) after repeated failures; here there is no retry: after the iteration cap the
  last iterate is used (``reached`` in the report says whether the target was met).
- Stop rule: an image stops once d(x_T) <= target, measured on the iteration's own forward pass
  (before the update, as Han's early stop). SAIL's threshold ``l_thres = 8.2`` applies to its
  whole loss in SD 1.4 units (the Gaussianity term alone is about 0.05 * 128 = 6.4 at 4x64x64
  latents), which does not carry over to other resolutions or models; Han's 0.9 is in SD 1.4 units
  too. The default target here is the detector's calibrated first-step threshold
  (:meth:`~diffmem.mitigate.registry.MitigationContext.require_threshold`) divided by the strength.
- d is the model-output difference as the detector measures it; for v-prediction models that is
  the v difference (SAIL converts SD 2's output first), consistent with the calibrated threshold.
- x_T is optimised in the unit-Gaussian space (``run.latents / init_noise_sigma``) and fed through
  the run's ``scheduler.scale_model_input`` at the first timestep, so schedulers with
  ``init_noise_sigma != 1`` (Euler, ...) are handled. The report gives each image's
  ``latent_norm_ratio`` ||x_T'|| / ||x_T|| to check that the noise statistics stay sane.
- SAIL's Gaussianity term pulls x_T towards 0 and Adam moves every element by about lr per step
  whatever its gradient's size, so where the magnitude's gradient is weak x_T shrinks (on the tiny
  random test pipelines ||x_T|| fell by 15-18 % in 10 steps). ``keep_norm=True`` (off by default,
  as in both references) rescales each x_T to its original norm after every update.
- The optimisation's own UNet calls are not seen by attention hooks.

Strength ``s``: target = target(1) / s; ``s = 0`` changes nothing (bit-identical to plain
generation).

Gate: without one, x_T is optimised in ``on_start``. With a :class:`FirstStepGate`, the flagged
rows' x_T are optimised at step 0, written into ``run.latents`` and the step's model input, and
both branches of that step re-evaluated for them (:meth:`~diffmem.core.sampling.Step.recompute`);
unflagged prompts keep the plain generation bit for bit.

Report per prompt (``run.records["mitigation.xt"]``): ``magnitude_before``, ``magnitude_after``
(d at the first step of the mitigated run), ``iterations``, ``target``, ``reached``,
``latent_norm_ratio``, ``method``.
"""

from __future__ import annotations

import math

import torch

from diffmem.core.sampling import Run, Step
from diffmem.mitigate.base import FirstStepGate, MagnitudeTarget
from diffmem.runtime.errors import ConfigError

#: reference settings per method: optimiser, lr, iteration cap
METHODS = {
    "sail": {"optimizer": "adam", "lr": 0.05, "max_iterations": 10},
    "han": {"optimizer": "adamw", "lr": 0.01, "max_iterations": 1000},
}


class InitialNoiseOptimization(MagnitudeTarget):
    """Optimise each image's x_T until its first-step noise magnitude is under the target.

    Parameters:
        strength: target = ``target / strength``; 0 leaves the run unchanged.
        gate: optional :class:`FirstStepGate`.
        target: d at strength 1 (per image); default the gate's threshold. Built from the
            registry (``from_context``) it is the calibrated detector threshold.
        method: ``"sail"`` (Jeon et al. 2025, default) or ``"han"`` (Han et al. 2025).
        lr, max_iterations: default the method's reference values (SAIL 0.05 / 10, Han 0.01 / 1000).
        gaussianity: SAIL's lambda; default 0.05, or 0.01 for v-prediction models (SAIL's SD 2).
        keep_norm: after every update, rescale each image's x_T back to its original norm
            (projected descent on the sphere where Gaussian draws concentrate); off in both
            references.
    """

    name = "xt"

    def __init__(self, strength: float = 1.0, *, gate: FirstStepGate | None = None,
                 target: float | None = None, method: str = "sail", lr: float | None = None,
                 max_iterations: int | None = None, gaussianity: float | None = None,
                 keep_norm: bool = False) -> None:
        super().__init__(strength, gate=gate, target=target)
        if method not in METHODS:
            raise ConfigError(f"xt: method must be one of {', '.join(METHODS)}, got {method!r}")
        ref = METHODS[method]
        lr = ref["lr"] if lr is None else lr
        max_iterations = ref["max_iterations"] if max_iterations is None else max_iterations
        if not (lr > 0 and math.isfinite(lr)):
            raise ConfigError(f"xt: lr must be > 0, got {lr}")
        if int(max_iterations) != max_iterations or max_iterations < 0:
            raise ConfigError(f"xt: max_iterations must be an integer >= 0, got {max_iterations}")
        if gaussianity is not None and not (gaussianity >= 0 and math.isfinite(gaussianity)):
            raise ConfigError(f"xt: gaussianity must be >= 0, got {gaussianity}")
        self.method = method
        self.lr = float(lr)
        self.max_iterations = int(max_iterations)
        self.gaussianity = gaussianity
        self.keep_norm = bool(keep_norm)

    def lambda_for(self, adapter) -> float:
        """SAIL's Gaussianity weight for this model."""
        if self.gaussianity is not None:
            return self.gaussianity
        return 0.01 if adapter.prediction_type == "v_prediction" else 0.05

    # ---------------------------------------------------------------- hook
    def on_start(self, run: Run) -> None:
        st = run.state(self)
        st.rows = torch.zeros(run.batch_size, dtype=torch.bool)
        if self.gate is None and self.strength != 0:
            self._optimise(run, self.targets(run))

    def on_step(self, run: Run, step: Step) -> None:
        if step.index != 0 or self.strength == 0:
            return
        rows = self.flagged_now(run, step)
        if self.gate is not None:
            if rows is None:
                return
            self._optimise(run, rows)
            idx = rows.nonzero().flatten().to(step.x_t.device)
            x_t = step.x_t.clone()
            x_t[idx] = run.scheduler.scale_model_input(run.latents[idx], step.t).to(x_t.dtype)
            step.x_t = x_t
            step.recompute(rows, {"uncond": run.uncond, "cond": run.cond})
        self.report_first_step(run, step)

    # ---------------------------------------------------------------- optimisation
    def _optimise(self, run: Run, rows: torch.Tensor) -> None:
        """Optimise ``run.latents[rows]`` (x_T) and write them back."""
        st = run.state(self)
        st.rows = rows.clone()
        idx = rows.nonzero().flatten()
        if len(idx) == 0:
            return
        adapter, sched = run.adapter, run.scheduler
        t = run.timesteps[0]
        dev_idx = idx.to(run.latents.device)
        sigma = sched.init_noise_sigma
        start = run.latents[dev_idx].detach().float() / sigma
        cond, uncond = run.cond[dev_idx].detach(), run.uncond[dev_idx].detach()
        z = start.clone().requires_grad_(True)
        if METHODS[self.method]["optimizer"] == "adam":
            opt = torch.optim.Adam([z], lr=self.lr)
        else:
            opt = torch.optim.AdamW([z], lr=self.lr)
        lam = self.lambda_for(adapter)
        target = self.effective_target
        n = len(idx)
        done = torch.zeros(n, dtype=torch.bool)
        iters = torch.zeros(n, dtype=torch.long)
        before = torch.full((n,), float("nan"))

        def diff(x):  # eps(x, c) - eps(x, empty) of unit-Gaussian latents x, per row
            x_in = sched.scale_model_input(x * sigma, t).to(adapter.dtype)
            m = len(x)
            out = adapter.eps(torch.cat([x_in, x_in]), t, torch.cat([uncond[a], cond[a]]))
            return out[m:].float() - out[:m].float()

        for it in range(max(self.max_iterations, 1)):
            active = (~done).nonzero().flatten()
            a = active.to(z.device)
            with torch.enable_grad():
                x = z[a]
                dvec = diff(x)
                d = dvec.flatten(1).norm(dim=1)
                d_cpu = d.detach().cpu()
                if it == 0:
                    before = d_cpu.clone()
                hit = d_cpu <= target
                done[active[hit]] = True
                if bool(done.all()) or self.max_iterations == 0:
                    break
                if self.method == "sail":
                    unit = dvec / d.clamp_min(1e-12).reshape(-1, *([1] * (dvec.ndim - 1)))
                    loss = diff(x + unit).flatten(1).norm(dim=1) + lam * x.flatten(1).norm(dim=1)
                else:
                    loss = d
                keep = (~hit).float().to(loss.device)
                (grad,) = torch.autograd.grad((loss * keep).sum(), z)
            frozen = z.detach().clone()
            z.grad = grad
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                still = done.to(z.device)
                z[still] = frozen[still]  # images under the target stop moving
                if self.keep_norm:
                    moved = (~done).nonzero().flatten().to(z.device)
                    scale = start[moved].flatten(1).norm(dim=1) \
                        / z[moved].flatten(1).norm(dim=1).clamp_min(1e-12)
                    z[moved] *= scale.reshape(-1, *([1] * (z.ndim - 1)))
            iters[~done] += 1
        new = z.detach()
        ratio = (new.flatten(1).norm(dim=1) / start.flatten(1).norm(dim=1)).cpu()
        latents = run.latents.clone()
        latents[dev_idx] = (new * sigma).to(latents.dtype)
        run.latents = latents
        for k, i in enumerate(idx.tolist()):
            self.report(run, i, magnitude_before=float(before[k]), iterations=int(iters[k]),
                        target=target, latent_norm_ratio=float(ratio[k]), method=self.method)

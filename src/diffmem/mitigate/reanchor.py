"""Prompt re-anchoring with the smallest clearing edit (after Chen et al.'s PRSS, CVPR 2025).

Chen et al., "Enhancing Privacy-Utility Trade-offs to Mitigate Memorization in Diffusion
Models" (CVPR 2025; reference code ``chenchen-usyd/BE-PRSS``, ``local_sd_pipeline.py``). Prompt
re-anchoring (PR) guides with a rewritten prompt and uses the ORIGINAL prompt's prediction as an
anchor to move away from, per step, when the rewritten prompt's noise magnitude
m = || eps_mod - eps_u || is still above ``l_target``::

    eps = eps_orig + s (eps_mod - eps_orig) + (g - s) (eps_mod - eps_u)
    s   = min((m - c) / (M - c) * g, g),  c = (g * l_target - M) / (g - 1)      if m > l_target
    eps = eps_u + g (eps_mod - eps_u)                                           otherwise (s = 1)

with g the guidance scale; s runs linearly from 1 at m = l_target (plain CFG with the rewritten
prompt) to g at m = M = ``mag_thres_pr`` (guidance from the original prompt towards the rewritten
one, no unconditional term), and is capped at g. Reference values: ``l_target_pr`` 3,
``mag_thres_pr`` 5 (SD 1.4 magnitudes, one image per prompt). The reference's rewrites come from
semantic search (SS) over up to 25 captions written by a language model per prompt; this module
needs no language model: the rewrite is the smallest edit of :mod:`diffmem.explain` that clears
the detector (:meth:`~diffmem.explain.EditReport.minimal`: fewest edited words, then lowest score,
among variants without the top-attributed words whose first-step magnitude is under the
threshold), exactly as ``diffmem explain`` reports it.

Departures and traps:

- The reference takes m over the whole batch; here per image (:mod:`diffmem.core.magnitude`).
- ``l_target`` defaults to the detector's calibrated first-step threshold and ``M`` to
  ``l_target * 5 / 3`` (the reference's ratio), since the reference's absolute values are SD 1.4
  units.
- Which prompts: those the method targets (all, or the gate's flags) whose own first-step
  magnitude exceeds ``l_target`` (the reference's trigger); the others keep plain generation.
  A triggered prompt with no clearing edit is an error (:class:`~diffmem.runtime.errors.ConfigError`
  naming it): re-anchoring to a prompt that still memorizes would not mitigate. With
  ``unclearable="plain"`` (what ``diffmem eval mitigation`` uses, so that the method still gets
  its row) such a prompt keeps plain generation instead and its report says ``reason: "no
  clearing edit"``. ``rewrites=`` gives rewrites directly (no search).
- Cost: the edit search (token attribution + one batched detector run over the variants) per
  distinct triggered prompt, and one extra UNet branch ("reanchor") per step for the triggered
  rows. At step 0 the rewritten prompt is evaluated by :meth:`~diffmem.core.sampling.Step.recompute`
  (one extra call for those rows), so re-anchoring applies from the first step.
- The PR rule needs CFG (g > 1); rows with g <= 1 keep their prediction.

Strength ``lam``: eps = eps_plain + lam (eps_PR - eps_plain), eps_plain being the prediction the
step had (CFG with the original prompt): 0 changes nothing (bit-identical), 1 is the reference.

Report per prompt (``run.records["mitigation.reanchor"]``): ``magnitude``, ``prompt_used``,
``edit``, ``edit_score``, ``s_first`` (s at step 0), ``s_mean`` (mean s over the steps).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from diffmem.core.magnitude import noise_magnitude
from diffmem.core.sampling import Branch, Run, Step
from diffmem.mitigate.base import FirstStepGate, Mitigation
from diffmem.runtime.errors import ConfigError

#: the reference's mag_thres_pr / l_target_pr (5 / 3)
HIGH_RATIO = 5 / 3


class PromptReanchoring(Mitigation):
    """Guide with the smallest clearing edit of the prompt, re-anchored on the original.

    Parameters:
        strength: interpolation between the plain prediction (0) and PR (1).
        gate: optional :class:`FirstStepGate`.
        threshold: ``l_target`` (per image); default the gate's threshold; also the threshold the
            edit must clear. From the registry: the calibrated detector threshold.
        high: ``M`` (``mag_thres_pr``); default ``threshold * 5 / 3``.
        rewrites: optional ``{prompt: rewritten prompt}`` used instead of the edit search.
        seed, top_k, combine: settings of the edit search (as ``diffmem explain``).
        unclearable: ``"error"`` (a triggered prompt without a clearing edit raises
            :class:`ConfigError`) or ``"plain"`` (it keeps plain generation, reported).
    """

    name = "reanchor"

    def __init__(self, strength: float = 1.0, *, gate: FirstStepGate | None = None,
                 threshold: float | None = None, high: float | None = None,
                 rewrites: Mapping[str, str] | None = None, seed: int = 0, top_k: int = 5,
                 combine: int = 5, unclearable: str = "error") -> None:
        super().__init__(strength, gate=gate)
        if unclearable not in ("error", "plain"):
            raise ConfigError(f"reanchor: unclearable must be 'error' or 'plain', got "
                              f"{unclearable!r}")
        self.unclearable = unclearable
        if threshold is None and gate is not None:
            threshold = gate.threshold
        if threshold is None:
            raise ConfigError("reanchor: needs the detector threshold: pass threshold= or a "
                              "gate, or build it with build_mitigations")
        if not math.isfinite(threshold) or threshold <= 0:
            raise ConfigError(f"reanchor: threshold must be a finite number > 0, got {threshold}")
        high = threshold * HIGH_RATIO if high is None else float(high)
        if not math.isfinite(high) or high <= threshold:
            raise ConfigError(f"reanchor: high must be finite and > threshold ({threshold}), "
                              f"got {high}")
        self.threshold = float(threshold)
        self.high = high
        self.rewrites = dict(rewrites or {})
        self.seed = int(seed)
        self.top_k = int(top_k)
        self.combine = int(combine)

    @classmethod
    def from_context(cls, strength, gate, context) -> PromptReanchoring:
        return cls(strength, gate=gate, threshold=context.require_threshold(), seed=context.seed,
                   unclearable=context.unclearable)

    # ---------------------------------------------------------------- rewrites
    def rewrite(self, adapter, prompts: list[str]) -> dict[str, tuple[str, dict]]:
        """``{prompt: (rewritten prompt, info)}``. A prompt with no clearing edit raises
        :class:`ConfigError` (``unclearable="error"``) or is left out (``"plain"``)."""
        out = {p: (self.rewrites[p], {"edit": "given"}) for p in prompts if p in self.rewrites}
        todo = [p for p in dict.fromkeys(prompts) if p not in out]
        if not todo:
            return out
        from diffmem.detect import NoiseMagnitude
        from diffmem.explain import TokenAttributor, attribute_with_ablation, suggest_edits

        attributions = TokenAttributor(adapter, steps=1, seeds=1, seed=self.seed).attribute(todo)
        detector = NoiseMagnitude(steps=1, generations=1, seed=self.seed)
        attributions = attribute_with_ablation(adapter, attributions, detector=detector)
        reports = suggest_edits(adapter, attributions, detector=detector,
                                threshold=self.threshold, top_k=self.top_k, combine=self.combine)
        for p, rep in zip(todo, reports, strict=True):
            best = rep.minimal
            if best is None and self.unclearable == "plain":
                continue
            if best is None:
                low = f"; lowest variant {rep.best.prompt!r} at {rep.best.score:.4g}" \
                    if rep.best else ""
                raise ConfigError(f"reanchor: no edit of {p!r} brings its noise magnitude under "
                                  f"the threshold {self.threshold:.4g}{low}; pass rewrites= or "
                                  "use another method")
            out[p] = (best.prompt, {"edit": best.describe(), "edit_score": best.score})
        return out

    # ---------------------------------------------------------------- hook
    def on_start(self, run: Run) -> None:
        st = run.state(self)
        st.rows = torch.zeros(run.batch_size, dtype=torch.bool)
        st.emb = None
        st.s_sum = torch.zeros(run.batch_size, dtype=torch.float64)
        st.s_count = torch.zeros(run.batch_size, dtype=torch.long)

    def before_step(self, run: Run, step: Step) -> None:
        st = run.state(self)
        if step.index > 0 and bool(st.rows.any()):
            step.add_branch("reanchor", st.emb, mask=st.rows)

    def on_step(self, run: Run, step: Step) -> None:
        if self.strength == 0:
            return
        st = run.state(self)
        if step.index == 0:
            self._start(run, step)
        if bool(st.rows.any()) and "reanchor" in step.out:
            self._guide(run, step)

    def on_end(self, run: Run) -> None:
        st = run.state(self)
        for i in st.rows.nonzero().flatten().tolist():
            self.report(run, i, s_mean=float(st.s_sum[i] / max(int(st.s_count[i]), 1)))
        super().on_end(run)
        for i, row in enumerate(run.records[self.record_name]):
            if not bool(st.rows[i]):  # a target under the threshold was not re-anchored
                row["applied"] = False

    # ---------------------------------------------------------------- steps
    def _start(self, run: Run, step: Step) -> None:
        st = run.state(self)
        targets = self.targets(run)
        if targets is None or not bool(targets.any()):
            return
        d = noise_magnitude(step.eps_cond, step.eps_uncond).detach().cpu()
        rows = targets & (d > self.threshold)
        for i in (targets & ~rows).nonzero().flatten().tolist():
            self.report(run, i, magnitude=float(d[i]), reason="under the threshold")
        if not bool(rows.any()):
            return
        idx = rows.nonzero().flatten().tolist()
        rewritten = self.rewrite(run.adapter, [run.prompts[i] for i in idx])
        for i in [i for i in idx if run.prompts[i] not in rewritten]:  # unclearable="plain"
            rows[i] = False
            self.report(run, i, magnitude=float(d[i]), reason="no clearing edit")
        idx = [i for i in idx if rows[i]]
        if not idx:
            return
        emb = run.cond.clone()
        with torch.no_grad():
            new = run.adapter.encode([rewritten[run.prompts[i]][0] for i in idx])
        emb[torch.tensor(idx, device=emb.device)] = new.to(emb.dtype)
        st.rows, st.emb = rows, emb
        for i in idx:
            text, info = rewritten[run.prompts[i]]
            self.report(run, i, magnitude=float(d[i]), prompt_used=text, **info)
        # evaluate the rewritten prompt at this step (one call for these rows), keep "cond" intact
        eps_orig = step.out["cond"]
        step.recompute(rows, {"cond": emb})
        mod = torch.full_like(eps_orig, float("nan"))
        sel = rows.to(mod.device)
        mod[sel] = step.out["cond"][sel]
        step.out["cond"] = eps_orig
        step.out["reanchor"] = mod
        step.branches["reanchor"] = Branch(emb, rows.clone())
        step.guide()

    def _guide(self, run: Run, step: Step) -> None:
        st = run.state(self)
        b = run.batch_size
        u, c, m = (step.out[k].float() for k in ("uncond", "cond", "reanchor"))
        w = step.guidance_scale
        g = w.detach().float().reshape(-1).cpu() if isinstance(w, torch.Tensor) \
            else torch.full((b,), float(w))
        g = g.expand(b).clone()
        rows = st.rows & step.evaluated("reanchor") & step.evaluated("uncond") \
            & step.evaluated("cond") & (g > 1)
        if not bool(rows.any()):
            return
        mag = noise_magnitude(m, u).cpu()
        lo, hi = self.threshold, self.high
        gsafe = torch.where(g > 1, g, torch.full_like(g, 2.0))
        c0 = (gsafe * lo - hi) / (gsafe - 1)
        s = torch.where(mag > lo, torch.minimum((mag - c0) / (hi - c0) * gsafe, gsafe),
                        torch.ones_like(g))
        s = torch.where(rows, s, torch.zeros_like(s))
        shape = (-1,) + (1,) * (u.ndim - 1)
        sd, gd = s.to(u.device).reshape(shape), gsafe.to(u.device).reshape(shape)
        pr = c + sd * (m - c) + (gd - sd) * (m - u)
        plain = step.eps.float()
        new = plain + self.strength * (pr - plain)
        sel = rows.to(u.device).reshape(shape)
        step.eps = torch.where(sel, new.to(step.eps.dtype), step.eps)
        st.s_sum += torch.where(rows, s, torch.zeros_like(s)).double()
        st.s_count += rows.long()
        if step.index == 0:
            for i in rows.nonzero().flatten().tolist():
                self.report(run, i, s_first=float(s[i]))

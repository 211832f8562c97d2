"""What every inference-time mitigation shares: a strength, an optional detection gate, a report.

A mitigation is a :class:`~diffmem.core.sampling.Hook` (or several methods are) of the sampling core:
it changes the text, the embeddings, x_T, the branches, the guidance or the attention of a run. Each
method is one small module of :mod:`diffmem.mitigate` citing its paper.

Conventions:

- ``strength`` >= 0 scales the method from "off" (0: the run is exactly the plain run, tested per
  method) to the reference configuration (1) and beyond; each method documents its mapping.
- ``gate``: ``None`` mitigates every prompt; a :class:`FirstStepGate` mitigates only the prompts
  whose first-step noise magnitude (Wen et al. 2024, eq. 4) passes a calibrated threshold, read from
  the run's own first UNet call (no extra call). Prompts the gate does not flag keep exactly the
  plain generation (bit-identical). Methods that act before the first step (new text, embeddings or
  x_T) apply to flagged prompts by changing their conditioning at step 0 and re-evaluating that
  step for them only (:meth:`~diffmem.core.sampling.Step.recompute`).
- What a method did to each prompt goes to ``run.records["mitigation." + name]``: a list with one
  dict per prompt (``applied`` plus method-specific fields).
"""

from __future__ import annotations

import math

import torch

from diffmem.core.magnitude import noise_magnitude
from diffmem.core.sampling import Hook, Run, Step
from diffmem.runtime.errors import ConfigError


class FirstStepGate(Hook):
    """Flags the prompts of a run whose first-step noise magnitude exceeds ``threshold``.

    d = || eps(x_T, c) - eps(x_T, empty) ||_2 per image (Wen et al. 2024, Sec. 3.1, eq. 4), from the
    first step's own cond and uncond predictions: the gate costs no UNet call. Place it before the
    mitigations it gates (:func:`diffmem.mitigate.build_mitigations` does).
    """

    name = "gate"

    def __init__(self, threshold: float) -> None:
        if not math.isfinite(threshold):
            raise ConfigError(f"gate threshold must be finite, got {threshold}")
        self.threshold = float(threshold)

    def on_start(self, run: Run) -> None:
        run.state(self).flagged = None

    def on_step(self, run: Run, step: Step) -> None:
        if step.index != 0:
            return
        if step.eps_cond is None or step.eps_uncond is None:
            raise ConfigError("the gate needs both the cond and the uncond branch at the first step")
        d = noise_magnitude(step.eps_cond, step.eps_uncond).detach().cpu()
        flagged = d > self.threshold
        run.state(self).flagged = flagged
        run.records[self.name] = [{"score": float(x), "threshold": self.threshold, "flagged": bool(f)}
                                  for x, f in zip(d.tolist(), flagged.tolist(), strict=True)]

    def flagged(self, run: Run) -> torch.Tensor | None:
        """(B,) bool once the first step was evaluated, else None."""
        return run.state(self).flagged


class Mitigation(Hook):
    """Base class of inference-time mitigations.

    Parameters:
        strength: >= 0; 0 leaves the run exactly as it is, 1 is the reference configuration.
        gate: ``None`` (mitigate every prompt) or a :class:`FirstStepGate`.
    """

    name = "mitigation"

    def __init__(self, strength: float = 1.0, *, gate: FirstStepGate | None = None) -> None:
        strength = float(strength)
        if not math.isfinite(strength) or strength < 0:
            raise ConfigError(f"{self.name}: strength must be a finite number >= 0, got {strength}")
        self.strength = strength
        self.gate = gate

    @property
    def record_name(self) -> str:
        return f"mitigation.{self.name}"

    def targets(self, run: Run) -> torch.Tensor | None:
        """(B,) bool: the prompts this method changes; None while the gate has not decided yet.
        With strength 0 no prompt is a target."""
        if self.strength == 0:
            return torch.zeros(run.batch_size, dtype=torch.bool)
        if self.gate is None:
            return torch.ones(run.batch_size, dtype=torch.bool)
        return self.gate.flagged(run)

    def flagged_now(self, run: Run, step: Step) -> torch.Tensor | None:
        """At the first step of a gated run, the prompts the gate has just flagged (for methods
        that act before the first step and must now change those prompts and re-evaluate the
        step, :meth:`~diffmem.core.sampling.Step.recompute`); None at any other step, without a
        gate, at strength 0 or when no prompt is flagged."""
        if step.index != 0 or self.gate is None or self.strength == 0:
            return None
        flagged = self.targets(run)
        return flagged if flagged is not None and bool(flagged.any()) else None

    def report(self, run: Run, i: int, **fields) -> None:
        """Record what the method did to prompt ``i`` (merged into its dict)."""
        rows = run.records.setdefault(self.record_name,
                                      [{"applied": False} for _ in range(run.batch_size)])
        rows[i].update(fields)

    def on_end(self, run: Run) -> None:
        targets = self.targets(run)
        rows = run.records.setdefault(self.record_name,
                                      [{"applied": False} for _ in range(run.batch_size)])
        if targets is not None:
            for i, hit in enumerate(targets.tolist()):
                rows[i].setdefault("applied", bool(hit))
                if hit:
                    rows[i]["applied"] = True
        for row in rows:
            row.setdefault("strength", self.strength)


class MagnitudeTarget(Mitigation):
    """Base of the methods that optimise an input of the first step (the text embedding, x_T)
    until each image's first-step noise magnitude (Wen et al. 2024, eq. 4) is under a target.

    ``target`` defaults to the gate's threshold (or, through :meth:`from_context`, the calibrated
    detector threshold); strength ``s`` divides it (``s`` = 0: nothing moves). Subclasses record the
    rows they optimised in ``run.state(self).rows`` and call :meth:`report_first_step` from
    ``on_step`` at step 0 to report each row's magnitude after the optimisation.
    """

    def __init__(self, strength: float = 1.0, *, gate: FirstStepGate | None = None,
                 target: float | None = None) -> None:
        super().__init__(strength, gate=gate)
        if target is None and gate is not None:
            target = gate.threshold
        if target is None:
            raise ConfigError(f"{self.name}: needs a target noise magnitude (the detector "
                              "threshold): pass target= or a gate, or build it with "
                              "build_mitigations")
        if not math.isfinite(target) or target <= 0:
            raise ConfigError(f"{self.name}: target must be a finite number > 0, got {target}")
        self.target = float(target)

    @classmethod
    def from_context(cls, strength: float, gate: FirstStepGate | None, context) -> MagnitudeTarget:
        return cls(strength, gate=gate, target=context.require_threshold())

    @property
    def effective_target(self) -> float:
        return math.inf if self.strength == 0 else self.target / self.strength

    def report_first_step(self, run: Run, step: Step) -> None:
        """Each optimised row's magnitude at the first step and whether it reached the target."""
        rows = getattr(run.state(self), "rows", None)
        if rows is None or not bool(rows.any()):
            return
        after = noise_magnitude(step.eps_cond, step.eps_uncond).detach().cpu()
        for i in rows.nonzero().flatten().tolist():
            self.report(run, i, magnitude_after=float(after[i]),
                        reached=bool(after[i] <= self.effective_target))

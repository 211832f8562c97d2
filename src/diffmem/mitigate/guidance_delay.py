"""Delayed classifier-free guidance (Jain et al., CVPR 2025).

Jain, Kobayashi, Shibuya, Takida, Memon, Togelius, Mitsufuji, "Classifier-Free Guidance inside the
Attraction Basin May Cause Memorization" (CVPR 2025, arXiv 2411.16738). Memorized samples are pulled
into an "attraction basin" early in sampling, where CFG steers towards the training image. Applying
the guidance only after the trajectory has left the basin (a *transition point*) avoids it:

    eps_hat = eps_u + w_delay (eps_c - eps_u)   while the step is before the transition,
    eps_hat = eps_u + w (eps_c - eps_u)         after it (w: the run's guidance scale).

Modes (reference code ``SonyResearch/mitigating_memorization`` @ dc18d18 and its README):

- ``"static"``: w_delay = 0 (unconditional only) while t > 500 (README: ``--guidance_change_step
  500 --guidance_scale 0.0 --guidance_scale_later 7.5``);
- ``"opposite"``: w_delay = -2 (guidance away from the prompt) while t > 650 (README:
  ``--guidance_change_step 650 --guidance_scale -2.0``);
- ``"dynamic"`` (``generate_test_dataset_dtp.py``): w_delay = 1 (conditional only) until the first
  local minimum of the noise magnitude d_j = ||eps_c - eps_u|| along the run: at the first step j
  with d_j > d_{j-1} < d_{j-2}, guidance w applies from step j on. The magnitude needs both
  branches, so the reference (and this module) evaluates both at every step and uses eps_u +
  1 (eps_c - eps_u) = eps_c during the delay: no UNet call is saved.

Traps of the reference, fixed or noted here:

- the dynamic script uses an undefined ``cads`` and ignores ``--unet_path``; its magnitude is one
  norm over the whole batch (batch size 1 there), here it is per image (Wen et al. eq. 4,
  :func:`~diffmem.core.magnitude.noise_magnitude`), so each image has its own transition;
- the opposite + dynamic script exits at the transition and flips the sign of its global guidance
  scale at every step before it; here the opposite mode is the README's static variant (-2 until
  t = 650), without sign flips;
- the static script (``generate_test_dataset_stp.py``, named in the README) is not in the
  repository; "until t = 500" is taken as: delayed while t > 500 (the same for every schedule that
  has no step at t = 500 exactly).

Cost: ``static`` evaluates only the unconditional branch of targeted prompts while delayed (half a
step); ``opposite`` and ``dynamic`` evaluate both branches at every step (the cost of plain
sampling). With a gate, the gate decides at step 0 from both branches; flagged prompts are then
re-guided at step 0 (no extra UNet call). From step 1 on the unconditional-only branch could be
skipped for flagged prompts too, but the UNet's result for a row depends on the batch size at the
level of float rounding, so skipping would change the unflagged prompts' images by rounding (the
test ``test_gate_with_skip_evaluates_one_branch_for_flagged_prompts`` shows it); by default
(``skip=None``) gated runs therefore re-guide (full cost) and keep unflagged prompts
bit-identical; ``skip=True`` skips anyway.

Strength ``s`` scales how long the delay lasts, with T the training timesteps (1000):

- static / opposite: transition timestep t_s = T - s (T - t_ref) (s = 1: the reference 500 / 650;
  s = 0: t_s = T, no step is delayed; s = 2 in static mode: t_s = 0, every step but t = 0);
- dynamic: the delay cannot be shortened before its minimum is seen, so s <= 1 moves the delay's
  guidance from w (s = 0) to 1 (s = 1), w_delay = w + s (1 - w), and s > 1 keeps guidance 1
  until step ceil(s j) for a minimum detected at step j.

``s = 0`` is the plain run bit for bit.
"""

from __future__ import annotations

import math

import torch

from diffmem.core.magnitude import noise_magnitude
from diffmem.core.sampling import Run, Step
from diffmem.mitigate.base import FirstStepGate, Mitigation
from diffmem.runtime.errors import ConfigError

#: mode -> (guidance during the delay, reference transition timestep)
MODES: dict[str, tuple[float, float | None]] = {
    "static": (0.0, 500.0),
    "opposite": (-2.0, 650.0),
    "dynamic": (1.0, None),
}


class GuidanceDelay(Mitigation):
    """Jain et al. 2025: no (or opposite) guidance until a transition point, then normal CFG.

    Parameters:
        strength: how long the delay lasts (see the module docstring); 0 is the plain run.
        gate: optional :class:`~diffmem.mitigate.base.FirstStepGate`.
        mode: ``"static"`` (reference default), ``"dynamic"`` or ``"opposite"``.
        transition: reference transition timestep of static / opposite (500 / 650).
        delay_scale: guidance scale during the delay (0 / 1 / -2 by mode).
        skip: evaluate only the branch the delay needs (scale 0: uncond, 1: cond) for targeted
            prompts; ``None``: only without a gate (see the module docstring).
    """

    name = "delay"

    def __init__(self, strength: float = 1.0, *, gate: FirstStepGate | None = None,
                 mode: str = "static", transition: float | None = None,
                 delay_scale: float | None = None, skip: bool | None = None) -> None:
        super().__init__(strength, gate=gate)
        if mode not in MODES:
            raise ConfigError(f"delay: mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        ref_scale, ref_t = MODES[mode]
        self.delay_scale = ref_scale if delay_scale is None else float(delay_scale)
        if not math.isfinite(self.delay_scale):
            raise ConfigError(f"delay: delay_scale must be finite, got {delay_scale}")
        if transition is not None and mode == "dynamic":
            raise ConfigError("delay: the dynamic mode finds its transition; do not pass one")
        self.transition = ref_t if transition is None else float(transition)
        if self.transition is not None and not math.isfinite(self.transition):
            raise ConfigError(f"delay: transition must be finite, got {transition}")
        self.skip = skip

    # ------------------------------------------------------------------ helpers
    def transition_t(self, run: Run) -> float:
        """Static / opposite: the timestep after which guidance is normal (t_s)."""
        total = float(run.scheduler.config.num_train_timesteps)
        return total - self.strength * (total - self.transition)

    def _skipped_branch(self) -> str | None:
        if self.mode == "dynamic":
            return None
        return {0.0: "cond", 1.0: "uncond"}.get(self.delay_scale)

    def _skips(self) -> bool:
        return (self.gate is None) if self.skip is None else bool(self.skip)

    def _scales(self, step: Step) -> torch.Tensor:
        w = step.guidance_scale
        b = step.run.batch_size
        if isinstance(w, torch.Tensor):
            return w.detach().float().cpu().reshape(-1).expand(b).clone()
        return torch.full((b,), float(w))

    def _delayed(self, run: Run, step: Step) -> torch.Tensor | None:
        """(B,) bool: targeted prompts whose guidance is delayed at this step (static/opposite)."""
        targets = self.targets(run)
        if targets is None or float(step.t) <= run.state(self).t_s:
            return None
        return targets if bool(targets.any()) else None

    def _reguide(self, step: Step, rows: torch.Tensor, scale: torch.Tensor | float) -> None:
        w = self._scales(step)
        w[rows] = scale if not isinstance(scale, torch.Tensor) else scale[rows]
        step.guidance_scale = w
        step.guide()

    # ------------------------------------------------------------------ hooks
    def on_start(self, run: Run) -> None:
        st = run.state(self)
        b = run.batch_size
        st.t_s = self.transition_t(run) if self.mode != "dynamic" else None
        st.delayed_steps = torch.zeros(b, dtype=torch.long)
        st.prev = torch.full((b,), -1.0)
        st.prev2 = torch.full((b,), -1.0)
        st.switch = torch.full((b,), -1, dtype=torch.long)  # step from which guidance is normal
        st.found = torch.full((b,), -1, dtype=torch.long)  # step at which the minimum was seen

    def before_step(self, run: Run, step: Step) -> None:
        if self.strength == 0 or self.mode == "dynamic" or not self._skips():
            return
        branch = self._skipped_branch()
        delayed = self._delayed(run, step)
        if branch is not None and delayed is not None:
            step.skip(branch, delayed)

    def on_step(self, run: Run, step: Step) -> None:
        if self.strength == 0:
            return
        st = run.state(self)
        if self.mode == "dynamic":
            self._dynamic(run, step, st)
            return
        delayed = self._delayed(run, step)
        if delayed is None:
            return
        st.delayed_steps += delayed.long()
        self._reguide(step, delayed, self.delay_scale)

    def _dynamic(self, run: Run, step: Step, st) -> None:
        if step.eps_cond is None or step.eps_uncond is None:
            raise ConfigError("delay (dynamic) needs both the cond and the uncond branch")
        d = noise_magnitude(step.eps_cond, step.eps_uncond).detach().cpu()
        # the reference's test, with -1 for "no value yet": d_j > d_{j-1} and d_{j-2} > d_{j-1}
        new = (st.found < 0) & (d > st.prev) & (st.prev2 > st.prev)
        if bool(new.any()):
            st.found[new] = step.index
            st.switch[new] = math.ceil(max(self.strength, 1.0) * step.index)
        st.prev2, st.prev = st.prev, d
        targets = self.targets(run)
        if targets is None:
            return
        delayed = targets & ((st.switch < 0) | (step.index < st.switch))
        if not bool(delayed.any()):
            return
        st.delayed_steps += delayed.long()
        w = self._scales(step)
        s = min(self.strength, 1.0)
        self._reguide(step, delayed, w + s * (self.delay_scale - w))

    def on_end(self, run: Run) -> None:
        st = run.state(self)
        targets = self.targets(run)
        if targets is not None:
            for i, hit in enumerate(targets.tolist()):
                if not hit:
                    continue
                fields = {"mode": self.mode, "delayed_steps": int(st.delayed_steps[i])}
                if self.mode == "dynamic":
                    j = int(st.switch[i])
                    fields["minimum_step"] = None if st.found[i] < 0 else int(st.found[i]) - 1
                    fields["transition_step"] = None if j < 0 else j
                else:
                    fields["transition_t"] = st.t_s
                self.report(run, i, **fields)
        super().on_end(run)

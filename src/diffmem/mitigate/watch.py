"""The guard's watch: a hook that observes every run as it proceeds and halts the prompts it flags.

Two signals, both without an extra UNet call:

- the first-step noise magnitude (Wen et al. 2024, eq. 4) against a calibrated threshold, read from
  the run's own first cond/uncond predictions (as :class:`~diffmem.mitigate.base.FirstStepGate`);
- with the training set's index, every ``every``-th step the guided clean-latent estimate is
  decoded and searched in the index, and the prompt is flagged when it crosses AMG's threshold
  schedule (Chen et al. CVPR 2024, Sec. 3.4; :class:`~diffmem.detect.replication.ThresholdSchedule`).

A flagged prompt's plain run goes on to the end with the others (its image is discarded; the guard
regenerates it with mitigation, :mod:`diffmem.mitigate.guard`), so that every UNet call has the
batch of a plain run: the other prompts' images are then bit-identical to plain generation with
any number of threads. (Skipping the flagged rows saves their compute but changes the batch, and
with several threads the kernels then round differently, ~1e-5.) The run stops early only when
every prompt is flagged.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from diffmem.core.magnitude import noise_magnitude
from diffmem.core.sampling import Hook, Run, Step
from diffmem.detect.replication import DEFAULT_SCHEDULES, decode_and_search
from diffmem.models.profile import CopyCriterion
from diffmem.runtime.errors import ConfigError


class Watch(Hook):
    """Flags the prompts of a run by the first-step gate and (with ``index``) the per-step
    replication check every ``every`` steps; records per prompt ``flagged``, ``reason``
    (``"gate"``/``"replication"``), ``step`` (where it fired), ``score`` (first-step magnitude)
    and, for a replication flag, the nearest training item and its similarity. ``halt``: stop
    the run once every prompt is flagged (the guard without an index keeps the plain images as
    its reference, so it runs them to the end). ``every=0``: no
    replication checks during the run (the guard still verifies the final image)."""

    name = "guard.watch"

    def __init__(self, *, threshold: float | None = None, index=None, every: int = 10,
                 schedule=None, halt: bool = True) -> None:
        if threshold is not None and not math.isfinite(threshold):
            raise ConfigError(f"watch threshold must be finite, got {threshold}")
        if every < 0:
            raise ConfigError("the watch's check interval must be >= 1 step (0: no checks)")
        if threshold is None and index is None:
            raise ConfigError("the watch needs a first-step threshold or the training index")
        self.threshold = threshold
        self.index = index
        self.every = every
        self.halt = halt  # stop the run once every prompt is flagged (False: finish it)
        self.schedule = (schedule or DEFAULT_SCHEDULES[index.embedder.criterion]
                         if index is not None else None)

    def on_start(self, run: Run) -> None:
        st = run.state(self)
        b = run.batch_size
        st.flagged = torch.zeros(b, dtype=torch.bool)
        st.rows = [{"flagged": False, "reason": None, "step": None, "score": None}
                   for _ in range(b)]

    def on_step(self, run: Run, step: Step) -> None:
        st = run.state(self)
        if step.index == 0 and self.threshold is not None:
            if step.eps_cond is None or step.eps_uncond is None:
                raise ConfigError("the watch needs the cond and uncond branches at the first step")
            d = noise_magnitude(step.eps_cond, step.eps_uncond).detach().cpu()
            for i, x in enumerate(d.tolist()):
                st.rows[i]["score"] = float(x)
                if x > self.threshold:
                    self._flag(st, i, "gate", step.index)
        total = len(run.timesteps)
        last = step.index == total - 1
        if self.index is None or self.every == 0 or last or step.index % self.every:
            self._halt_if_done(run)
            return  # the final image is verified by the guard itself
        live = ~st.flagged
        if not bool(live.any()):
            self._halt_if_done(run)
            return
        found = decode_and_search(run, step, self.index, rows=live)
        raw = found.scores[:, 0].double().numpy()
        lam = self.schedule.at(run.adapter, step.t)
        margin = CopyCriterion(self.index.embedder.criterion, float(lam),
                               higher_is_copy=bool(self.index.embedder.higher_is_better)
                               ).margins(raw)
        for j, i in enumerate(live.nonzero().flatten().tolist()):
            if margin[j] > 0:
                self._flag(st, i, "replication", step.index)
                st.rows[i].update(nearest=found.ids[j][0], similarity=float(raw[j]))
        self._halt_if_done(run)

    def _halt_if_done(self, run: Run) -> None:
        if self.halt and bool(run.state(self).flagged.all()):
            run.stop = True  # every prompt is flagged: nothing of the plain run is served

    @staticmethod
    def _flag(st, i: int, reason: str, index: int) -> None:
        if not st.rows[i]["flagged"]:
            st.flagged[i] = True
            st.rows[i].update(flagged=True, reason=reason, step=index)

    def on_end(self, run: Run) -> None:
        run.records[self.name] = run.state(self).rows

    def flagged(self, run: Run) -> np.ndarray:
        return run.state(self).flagged.numpy().copy()

"""The detector interface: a hook that accumulates a per-prompt score, plus scikit-learn-style
calibration.

A detector is used in two ways, through one code path:

- standalone: ``detector.score(adapter, prompts)`` runs :func:`diffmem.core.sampling.sample` with
  the detector as the only hook and stops as soon as the detector has seen its last step;
- during generation: pass the detector in ``hooks=`` of any :func:`sample` call; its per-prompt
  scores appear in ``result.records[detector.name]``.

Scores follow one direction everywhere: higher = more likely memorized. ``fit`` calibrates
``threshold_`` on prompts known to be clean at a target false-positive rate;
``decision_function`` is ``score - threshold_`` and ``predict`` is ``decision_function > 0``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch

from diffmem.core.sampling import Hook, Run, Step, sample, seeded_generators
from diffmem.errors import ConfigError, PromptError
from diffmem.models.adapter import ModelAdapter, load_adapter


class Detector(Hook, ABC):
    """Base class: subclasses implement :meth:`step_scores` (and may override the step selection).

    Parameters:
        steps: which denoising steps contribute: an int ``n`` for the first ``n`` steps, a sequence
            of step indices, or ``"all"``.
        generations: independent initial noises per prompt; scores are averaged over them.
        num_inference_steps, guidance_scale, scheduler: sampling settings of standalone scoring.
        fpr: target false-positive rate of :meth:`fit`.
        batch_size: prompts x generations per batched run.
        seed: generation ``g`` of every prompt uses generator seed ``seed + g``.
    """

    name = "detector"

    def __init__(self, *, steps: int | Sequence[int] | str = 1, generations: int = 1,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 scheduler: str | None = None, fpr: float = 0.01, batch_size: int = 16,
                 seed: int = 0) -> None:
        self.steps = steps
        self.generations = generations
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.scheduler = scheduler
        self.fpr = fpr
        self.batch_size = batch_size
        self.seed = seed
        self._validate()
        self._early_stop = False

    def _validate(self) -> None:
        if self.generations < 1:
            raise ConfigError("generations must be >= 1")
        if not 0 < self.fpr < 1:
            raise ConfigError("fpr must be in (0, 1)")
        if isinstance(self.steps, int) and self.steps < 1:
            raise ConfigError("steps must be >= 1")
        if isinstance(self.steps, str) and self.steps != "all":
            raise ConfigError(f"steps must be an int, a list of step indices or 'all', "
                              f"got {self.steps!r}")

    # ------------------------------------------------------------------ step selection
    def selected(self, index: int, total: int) -> bool:
        """Whether step ``index`` (of ``total``) contributes to the score."""
        if self.steps == "all":
            return True
        if isinstance(self.steps, int):
            return index < self.steps
        return index in set(self.steps)

    def last_step(self, total: int) -> int:
        """Index of the last step that contributes (the run may stop after it)."""
        if self.steps == "all":
            return total - 1
        if isinstance(self.steps, int):
            return min(self.steps, total) - 1
        return min(max(self.steps), total - 1)

    # ------------------------------------------------------------------ hook
    def on_start(self, run: Run) -> None:
        self._sum = torch.zeros(run.batch_size, dtype=torch.float64)
        self._count = 0

    def on_step(self, run: Run, step: Step) -> None:
        total = len(run.timesteps)
        if self.selected(step.index, total):
            self._sum += self.step_scores(run, step).detach().double().cpu()
            self._count += 1
        if self._early_stop and step.index >= self.last_step(total):
            run.stop = True

    def on_end(self, run: Run) -> None:
        run.records[self.name] = (self._sum / max(self._count, 1)).numpy()

    @abstractmethod
    def step_scores(self, run: Run, step: Step) -> torch.Tensor:
        """Per-prompt score contribution ``(B,)`` at one selected step."""

    # ------------------------------------------------------------------ estimator
    def score(self, model: ModelAdapter | str, prompts: Sequence[str]) -> np.ndarray:
        """One score per prompt (higher = more memorized), averaged over ``generations``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise PromptError("no prompts to score")
        adapter = load_adapter(model, scheduler=self.scheduler)
        jobs = [(i, g) for i in range(len(prompts)) for g in range(self.generations)]
        sums = np.zeros(len(prompts))
        self._early_stop = True
        try:
            for k in range(0, len(jobs), self.batch_size):
                chunk = jobs[k : k + self.batch_size]
                res = sample(adapter, [prompts[i] for i, _ in chunk],
                             num_inference_steps=self.num_inference_steps,
                             guidance_scale=self.guidance_scale,
                             generator=seeded_generators([self.seed + g for _, g in chunk],
                                                         adapter.device),
                             hooks=[self], decode=False)
                for (i, _), s in zip(chunk, res.records[self.name], strict=True):
                    sums[i] += s
        finally:
            self._early_stop = False
        return sums / self.generations

    def fit(self, model: ModelAdapter | str | None = None,
            clean_prompts: Sequence[str] | None = None, *,
            scores: Sequence[float] | None = None) -> Detector:
        """Calibrate ``threshold_`` so that at most ``fpr`` of clean prompts score above it."""
        if scores is None:
            if model is None or clean_prompts is None:
                raise ConfigError("fit needs a model and clean prompts, or precomputed scores")
            scores = self.score(model, clean_prompts)
        scores = np.asarray(scores, dtype=float)
        if scores.size == 0:
            raise PromptError("no clean prompts to calibrate on")
        self.threshold_ = float(np.quantile(scores, 1 - self.fpr, method="higher"))
        self.n_calibration_ = int(scores.size)
        return self

    def decision_function(self, scores: Sequence[float]) -> np.ndarray:
        """``score - threshold_``: positive means flagged as memorized."""
        if not hasattr(self, "threshold_"):
            raise ConfigError(f"{type(self).__name__} is not calibrated; call fit() first")
        return np.asarray(scores, dtype=float) - self.threshold_

    def predict(self, model: ModelAdapter | str, prompts: Sequence[str]) -> np.ndarray:
        """Boolean flags: True where the prompt is predicted to trigger memorization."""
        return self.decision_function(self.score(model, prompts)) > 0

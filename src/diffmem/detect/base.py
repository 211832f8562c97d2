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
from diffmem.core.steps import StepSpec, check_steps, select_steps
from diffmem.models.adapter import ModelAdapter, load_adapter
from diffmem.models.calibration import threshold_at_fpr
from diffmem.runtime.defaults import SAMPLING
from diffmem.runtime.errors import ConfigError, PromptError

#: How initial noises are seeded (see :class:`Detector`).
SEED_MODES = ("per-generation", "per-prompt")


class Detector(Hook, ABC):
    """Base class: subclasses implement :meth:`step_scores` (and may override the step selection).

    Parameters:
        steps: which denoising steps contribute (:mod:`diffmem.core.steps`): an int ``n`` for the
            first ``n`` steps, ``"last:n"``, ``"all"`` or a sequence of step indices. The same
            meaning in every detector.
        generations: independent initial noises per prompt; scores are averaged over them.
        num_inference_steps, guidance_scale, scheduler: sampling settings of standalone scoring.
        fpr: target false-positive rate of :meth:`fit`.
        batch_size: prompts x generations per batched run.
        seed, seed_mode: which initial noise each image gets. ``"per-generation"`` (diffmem's
            default): generation ``g`` of every prompt uses generator seed ``seed + g``, so all
            prompts are scored on the same noises. ``"per-prompt"`` (the convention of Wen et
            al.'s reference ``detect_mem.py`` and of ``diffmem generate``): prompt ``i`` uses seed
            ``seed + i``, its ``generations`` noises drawn at once from that generator, as the
            pipeline draws ``num_images_per_prompt`` latents.

    A detector keeps nothing about a run on itself (its totals live in ``run.state(self)``), so
    one detector object may score several runs at once.
    """

    name = "detector"
    #: how a prompt's generations are combined: "mean" or "max" (the prompt scores as its most
    #: memorized generation)
    reduce_generations = "mean"
    #: whether the detector needs the training set's index (``make_detector(index=...)``)
    needs_index = False
    #: whether a score is the margin to the model's copy criterion (> 0: its generations copy a
    #: training image): then 0 is the decision threshold and nothing is calibrated
    scores_are_copy_margins = False

    def __init__(self, *, steps: StepSpec = 1, generations: int = 1,
                 num_inference_steps: int = SAMPLING.steps, guidance_scale: float = SAMPLING.guidance_scale,
                 scheduler: str | None = None, fpr: float = 0.01, batch_size: int = 16,
                 seed: int = 0, seed_mode: str = "per-generation") -> None:
        self.steps = check_steps(steps)
        self.generations = generations
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.scheduler = scheduler
        self.fpr = fpr
        self.batch_size = batch_size
        self.seed = seed
        self.seed_mode = seed_mode.replace("_", "-")
        self._validate()

    def _validate(self) -> None:
        if self.generations < 1:
            raise ConfigError("generations must be >= 1")
        if not 0 < self.fpr < 1:
            raise ConfigError("fpr must be in (0, 1)")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be >= 1")
        if self.num_inference_steps < 1:
            raise ConfigError("num_inference_steps must be >= 1")
        if self.seed_mode not in SEED_MODES:
            raise ConfigError(f"seed_mode must be one of {', '.join(SEED_MODES)}, got "
                              f"{self.seed_mode!r}")

    # ------------------------------------------------------------------ step selection
    def selected_steps(self, run: Run) -> set[int]:
        """Indices of the steps of ``run`` that contribute to the score."""
        st = run.state(self)
        if not hasattr(st, "selected"):
            st.selected = set(select_steps(self.steps, len(run.timesteps)))
        return st.selected

    def selected(self, run: Run, step: Step) -> bool:
        """Whether ``step`` contributes to the score."""
        return step.index in self.selected_steps(run)

    def last_step(self, run: Run) -> int:
        """Index of the last step that contributes (standalone scoring stops after it)."""
        return max(self.selected_steps(run))

    # ------------------------------------------------------------------ hook
    def on_start(self, run: Run) -> None:
        st = run.state(self)
        st.sum = torch.zeros(run.batch_size, dtype=torch.float64)
        st.count = 0

    def on_step(self, run: Run, step: Step) -> None:
        if self.selected(run, step):
            st = run.state(self)
            st.sum += self.step_scores(run, step).detach().double().cpu()
            st.count += 1

    def on_end(self, run: Run) -> None:
        st = run.state(self)
        run.records[self.name] = (st.sum / max(st.count, 1)).numpy()

    @abstractmethod
    def step_scores(self, run: Run, step: Step) -> torch.Tensor:
        """Per-prompt score contribution ``(B,)`` at one selected step."""

    # ------------------------------------------------------------------ estimator
    def score(self, model: ModelAdapter | str, prompts: Sequence[str]) -> np.ndarray:
        """One score per prompt (higher = more memorized), averaged over ``generations`` (or
        their maximum, when :attr:`reduce_generations` is ``"max"``)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise PromptError("no prompts to score")
        from diffmem.runtime.progress import progress

        adapter = load_adapter(model, scheduler=self.scheduler)
        jobs = [(i, g) for i in range(len(prompts)) for g in range(self.generations)]
        per = np.zeros((len(prompts), self.generations))
        with progress(len(jobs), f"score ({self.name})", unit="img") as bar:
            for k in range(0, len(jobs), self.batch_size):
                chunk = jobs[k : k + self.batch_size]
                gens, latents = self._noise(adapter, chunk)
                res = sample(adapter, [prompts[i] for i, _ in chunk],
                             num_inference_steps=self.num_inference_steps,
                             guidance_scale=self.guidance_scale, generator=gens, latents=latents,
                             hooks=[self], decode=False, stop_when_done=True)
                for (i, g), s in zip(chunk, res.records[self.name], strict=True):
                    per[i, g] = s
                bar.update(len(chunk))
        return per.max(axis=1) if self.reduce_generations == "max" else per.mean(axis=1)

    def _noise(self, adapter: ModelAdapter, chunk: list[tuple[int, int]]):
        """Generators and (for ``per-prompt``) initial noises of (prompt, generation) jobs."""
        if self.seed_mode == "per-generation":
            return seeded_generators([self.seed + g for _, g in chunk], adapter.device), None
        from diffusers.utils.torch_utils import randn_tensor

        f = adapter.vae_scale_factor
        side = adapter.default_resolution // f
        shape = (self.generations, adapter.unet.config.in_channels, side, side)
        gens, rows, drawn = [], [], {}
        for i, g in chunk:
            if i not in drawn:  # all generations of prompt i from one generator, in one draw
                gen = torch.Generator(device=adapter.device).manual_seed(self.seed + i)
                drawn[i] = (gen, randn_tensor(shape, generator=gen, device=adapter.device,
                                              dtype=adapter.dtype))
            gens.append(drawn[i][0])
            rows.append(drawn[i][1][g])
        return gens, torch.stack(rows)

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
        self.threshold_ = threshold_at_fpr(scores, self.fpr)
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

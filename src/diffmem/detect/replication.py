"""Replication detection against the training set's index.

:class:`StepwiseReplication`: per-step detection (Chen, Liu & Xu, CVPR 2024, "Towards
Memorization-Free Diffusion Models", Sec. 3.4: automatic detection with a threshold schedule).
:class:`PreviewReplication`: the same check on the final image of a short preview generation.

At every checked step the guided clean-latent estimate is decoded and matched to its nearest
training image; the step *fires* when the similarity crosses the schedule lambda_t:

    x0_hat_t = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)            (DDIM eq. 9)
    s_t      = sim(D(x0_hat_t), n_0),  n_0 = nearest training image        (SSCD cosine or -tiled L2)
    fire_t   = s_t > lambda_t
    lambda_t = lenient + (strict - lenient) * abar_t^2                       (parabolic schedule)

``lambda_t`` is lenient early (blurry estimates, abar ~ 0) and strict late (abar ~ 1), following the
parabolic schedule of the paper (the clean re-implementation polimi-ispl/anti-memorization-tta uses
the same abar^2 form). For a distance criterion (tiled L2, lower = closer) the roles of the bounds
swap and "crossing" means falling below.

The per-prompt score is the largest margin over the checked steps (higher = more memorized); the
step at which each prompt first fired is recorded in ``run.records[name + "_fired_at"]`` (-1: never).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffmem.core.sampling import Run, Step
from diffmem.detect.base import Detector
from diffmem.runtime.errors import ConfigError


@dataclass(frozen=True)
class ThresholdSchedule:
    """lambda_t = lenient + (strict - lenient) * abar_t^2, in the criterion's own units."""

    strict: float  # threshold at the last steps (abar_t -> 1)
    lenient: float  # threshold at the first steps (abar_t -> 0)

    def __call__(self, abar: torch.Tensor) -> torch.Tensor:
        return self.lenient + (self.strict - self.lenient) * abar.float() ** 2

    def at(self, adapter, t: torch.Tensor | int) -> float:
        """lambda at timestep ``t`` of ``adapter``'s noise schedule."""
        return float(self(adapter.abar(t).cpu()))


@dataclass(frozen=True)
class ExponentialSchedule:
    """lambda_t = late + (early - late) * exp(-rate * t) for the training timestep ``t``.

    The form of AMG's reference code (``chenchen-usyd/AMG-sd``, ``ddim.py``:
    ``asy(t, 0.3, 0.4, 0.005, 0) = 0.3 + 0.1 exp(-0.005 t)``, SSCD units): 0.4 at t = 0 (the last
    steps), 0.3 + 0.1 e^-5 ~ 0.3007 at t = 1000 (the first). The paper calls its schedule
    parabolic; the code is exponential in t.
    """

    late: float = 0.4  # threshold at t = 0
    early: float = 0.3  # asymptote for large t
    rate: float = 0.005

    def __call__(self, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return self.early + (self.late - self.early) * torch.exp(-self.rate * t)

    def at(self, adapter, t: torch.Tensor | int) -> float:
        return float(self(torch.as_tensor(t).cpu()))


#: Defaults per criterion. SSCD: 0.5 is the usual copy threshold (Somepalli et al. 2023). Tiled L2
#: on the testbed: see docs/testbed.md for the measured distances of copies and non-copies.
DEFAULT_SCHEDULES = {
    "sscd_cosine": ThresholdSchedule(strict=0.5, lenient=0.3),
    "tiled_l2": ThresholdSchedule(strict=0.15, lenient=0.3),
}


@torch.no_grad()
def decode_and_search(run: Run, step: Step, index, *, rows: torch.Tensor | None = None,
                      k: int = 1, keep: list | None = None):
    """Decode the guided clean-latent estimate ``step.x0`` of the prompts ``rows`` ((B,) bool;
    None: all) and find their ``k`` nearest training items in ``index``, in one batched decode
    and one search. Returns the :class:`~diffmem.similarity.index.SearchResult` (one query per
    selected prompt, in prompt order); ``keep`` (a list) receives the decoded images."""
    x0 = step.x0 if rows is None else step.x0[rows.to(step.x0.device)]
    images = run.adapter.decode(x0).float().clamp(-1, 1).cpu()
    if keep is not None:
        keep.append(images)
    return index.search(images, k=min(k, len(index)))


class StepwiseReplication(Detector):
    """AMG's per-step detector: fires when the decoded x0 estimate matches a training image.

    Args:
        index: a :class:`diffmem.similarity.index.TrainingIndex` of the training set.
        schedule: the threshold schedule (:class:`ThresholdSchedule` or
            :class:`ExponentialSchedule`); default from :data:`DEFAULT_SCHEDULES` for the
            index's criterion.
        every: check every ``every``-th step (each check costs one VAE decode and one search).
        steps: as in :class:`Detector`; default ``"all"``.
    """

    name = "stepwise_replication"

    def __init__(self, index, *, schedule: ThresholdSchedule | ExponentialSchedule | None = None,
                 every: int = 1,
                 steps: int | str = "all", **options) -> None:
        if every < 1:
            raise ConfigError("every must be >= 1")
        super().__init__(steps=steps, **options)
        self.index = index
        self.schedule = schedule or DEFAULT_SCHEDULES[index.embedder.criterion]
        self.every = every

    def selected_steps(self, run: Run) -> set[int]:
        st = run.state(self)
        if not hasattr(st, "selected"):
            total = len(run.timesteps)
            st.selected = {i for i in super().selected_steps(run)
                           if i % self.every == 0 or i == total - 1}
        return st.selected

    def on_start(self, run: Run) -> None:
        b = run.batch_size
        st = run.state(self)
        st.best = np.full(b, -np.inf)
        st.fired_at = np.full(b, -1)
        st.nearest = [""] * b
        st.trace = [[] for _ in range(b)]

    def on_step(self, run: Run, step: Step) -> None:
        if not self.selected(run, step):
            return
        st = run.state(self)
        found = decode_and_search(run, step, self.index)
        # 1. similarity s_t and threshold lambda_t in the criterion's units
        raw = found.scores[:, 0].double()
        lam = self.schedule.at(run.adapter, step.t)
        # 2. margin > 0 <=> the step fires (sign flips for a distance)
        margin = _criterion(self.index, lam).margins(raw)
        margin = margin.numpy()
        for i in range(run.batch_size):
            st.trace[i].append(float(raw[i]))
            if margin[i] > st.best[i]:
                st.best[i] = margin[i]
                st.nearest[i] = found.ids[i][0]
            if margin[i] > 0 and st.fired_at[i] < 0:
                st.fired_at[i] = step.index

    def on_end(self, run: Run) -> None:
        st = run.state(self)
        run.records[self.name] = st.best
        run.records[self.name + "_fired_at"] = st.fired_at
        run.records[self.name + "_nearest"] = st.nearest
        run.records[self.name + "_trace"] = st.trace

    def step_scores(self, run: Run, step: Step) -> torch.Tensor:
        """Not used: this detector keeps the best margin over steps instead of a mean."""
        return torch.zeros(run.batch_size)


class PreviewReplication(Detector):
    """Does a short preview generation of the prompt copy a training image?

    Each generation runs a short schedule (``num_inference_steps``, default 20 steps instead of
    50) to its end; the final clean-latent estimate is decoded and matched to its nearest
    training image in ``index`` (the check of AMG's detector, Chen et al. CVPR 2024, Sec. 3.4,
    made once at the end). Score per generation: the margin to the copy threshold, ``threshold -
    distance`` (tiled L2) or ``similarity - threshold`` (SSCD cosine), so a score above 0 is a
    preview that copies; a prompt scores as its most copying generation (``max`` over
    generations, as a prompt copies when any of its generations does).

    A preview needs no training of its own and no labelled prompts, but it needs the training
    set's index (``diffmem index build``), and it costs ``generations x num_inference_steps x 2``
    UNet rows per prompt (160 with the defaults, 0.4 of four full 50-step generations) plus one
    VAE decode and one search per generation. As a hook of a full generation it checks that
    generation's own final image at no extra UNet cost. On the testbed's broad set a 20-step
    preview on a generation's initial noise tells whether the 50-step generation from that noise
    copies (AUC 0.9997; 10 steps: 0.998; docs/detection.md, where the length was chosen); whether
    20 steps suffice on another model is worth checking on a few of its known copies.

    Args:
        index: a :class:`~diffmem.similarity.index.TrainingIndex` or the folder of a saved one.
        threshold: copy threshold in the index's unit (default: 0.5 SSCD cosine, 0.15 tiled L2).
        criterion: the expected criterion, checked against the index (default: tiled L2 for a
            testbed model, SSCD cosine otherwise).
        num_inference_steps: length of the preview's schedule (default 20).
        generations: previews per prompt (default 4).
    """

    name = "preview_replication"
    reduce_generations = "max"
    needs_index = True
    scores_are_copy_margins = True

    def __init__(self, index=None, *, threshold: float | None = None,
                 criterion: str | None = None, num_inference_steps: int = 20,
                 generations: int = 4, steps=None, **options) -> None:
        from diffmem.models.profile import copy_criterion
        from diffmem.similarity.index import load_index

        if index is None:  # refused before the other options are read
            raise ConfigError("preview_replication needs the training set's index (--index IDX; "
                              "build it with `diffmem index build`)")
        if steps not in (None, "last:1"):
            raise ConfigError("preview_replication checks the last step only; leave --steps out")
        super().__init__(steps="last:1", generations=generations,
                         num_inference_steps=num_inference_steps, **options)
        self.index = load_index(index, what="preview_replication")
        self.criterion = self.index.embedder.criterion
        self.higher_is_better = bool(self.index.embedder.higher_is_better)
        self.copy_threshold = (copy_criterion(self.criterion).threshold
                                    if threshold is None else float(threshold))
        self._expected = criterion

    def on_start(self, run: Run) -> None:
        from diffmem.similarity.index_compat import check_index_model_once

        super().on_start(run)
        check_index_model_once(self.index, run.adapter, criterion=self._expected,
                               who="preview_replication")
        st = run.state(self)
        st.nearest, st.found, st.images = [""] * run.batch_size, None, []

    def step_scores(self, run: Run, step: Step) -> torch.Tensor:
        st = run.state(self)
        found = decode_and_search(run, step, self.index, keep=st.images)
        raw = found.scores[:, 0].double()
        st.nearest, st.found = [row[0] for row in found.ids], found
        return _criterion(self.index, self.copy_threshold).margins(raw)

    def on_end(self, run: Run) -> None:
        super().on_end(run)
        st = run.state(self)
        run.records[self.name + "_nearest"] = st.nearest
        # the evidence of each generation: its decoded preview ((B, 3, H, W) in [-1, 1]), the
        # nearest training item's row in the index and its raw similarity / distance
        if st.found is not None:
            run.records[self.name + "_preview"] = st.images[-1]
            run.records[self.name + "_row"] = st.found.indices[:, 0].tolist()
            run.records[self.name + "_similarity"] = st.found.scores[:, 0].tolist()
            run.records[self.name + "_caption"] = [c[0] for c in st.found.captions]


def _criterion(index, threshold: float):
    """The copy test of ``index``'s criterion at ``threshold`` (:class:`CopyCriterion`)."""
    from diffmem.models.profile import CopyCriterion

    return CopyCriterion(index.embedder.criterion, float(threshold),
                         higher_is_copy=bool(index.embedder.higher_is_better))

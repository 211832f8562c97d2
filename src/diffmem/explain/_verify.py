"""Edits checked by generation: does the edited prompt still copy a training image?

The detector behind the edit suggestions (first-step noise magnitude, Wen et al., ICLR 2024,
Sec. 3.1) sees the first denoising step only. An edit can bring that score under the threshold
while the rest of the prompt still pulls generation onto a memorized image (on the testbed's
broad set about a third of the detector-clearing edits still copied). :class:`EditVerifier`
narrows that gap for users who hold the training set: it generates each candidate edit with a few
seeds and searches the training-set index (:class:`~diffmem.similarity.index.TrainingIndex`,
SSCD cosine > 0.5 or the testbed's tiled L2 < 0.15 counts as a copy, the thresholds of
``diffmem eval replication``). Candidates are checked in the order a person would accept them
(detector-clearing, natural, fewest edited words, lowest score first), round by round over all
prompts in batched generations, and a prompt stops at its first edit that passes: no generation
copies (and, with a margin > 1, the closest stays that far beyond the copy threshold).

The seeds are drawn from 1000-1007 by default (the 4 of them under which the original prompt comes
closest to a training image): never the seeds 0-3 the testbed's labels and ``eval explanation``
judge with, so an edit is not chosen on the very noises it is judged by. The defaults (pool 8,
4 seeds confirmed on the other 4, 12 checks per level, 2 levels) were chosen on the broad set's
dev split (docs/explanation.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffmem.models.profile import CopyCriterion
from diffmem.runtime.defaults import SAMPLING
from diffmem.runtime.errors import ConfigError

__all__ = ["EditVerifier", "Verdict"]

#: first verification seed (kept away from the small seeds labels and evaluations use)
VERIFY_SEED = 1000


@dataclass(frozen=True)
class Verdict:
    """How one prompt's generations compare with the training set."""

    copies: int  # generations that copy a training image
    generations: int
    nearest_id: str  # the nearest training item of the closest generation
    score: float  # its similarity (cosine) or distance (tiled L2)
    passed: bool  # no copy, and the closest generation outside the verifier's margin

    @property
    def copying(self) -> bool:
        return self.copies > 0


class EditVerifier:
    """Generate prompts and count copies of training images (module docstring).

    Args:
        index: a :class:`~diffmem.similarity.index.TrainingIndex` or the folder of a saved one;
            it must hold the model's training set (for a testbed model: ``diffmem index build
            testbed``).
        seeds: generations per checked edit.
        seed: first seed of the pool.
        pool: with ``pool > seeds``, the original prompt is first generated with seeds ``seed``
            .. ``seed + pool - 1`` and its edits are checked on the ``seeds`` of them whose
            generations came closest to a training image (the noises under which the original
            copies); otherwise every prompt uses seeds ``seed`` .. ``seed + seeds - 1``.
        confirm: with a pool, an edit that passes on its ``seeds`` seeds is generated again with
            up to ``confirm`` more seeds of the pool (the next closest) and passes only if these
            copy nothing either (default: the rest of the pool). The first check fails a copying
            edit fast; the confirmation catches an edit that copies under fewer noises.
        max_checks: candidate edits generated per prompt (and per level) at most.
        depth: levels of editing: with 2 (the default), a prompt none of whose edits passes
            has the checked edit that stayed farthest from a copy attributed and edited again
            (:func:`~diffmem.explain.verify_edits` with ``extend``); 1: one level only.
        threshold: copy threshold in the index's unit (default: 0.5 SSCD cosine, 0.15 tiled L2).
        margin: an edit passes only when its closest generation stays ``margin`` times away from
            the copy threshold (distance > ``margin`` x threshold; similarity < threshold /
            ``margin``): copying is a matter of chance per seed, and an edit whose generations
            come near a training image in a few seeds copies in others.
        criterion: the index's expected criterion (default: tiled L2 for a testbed model, SSCD
            cosine otherwise; checked against the index, as AMG does).
    """

    def __init__(self, index, *, seeds: int = 4, seed: int = VERIFY_SEED, max_checks: int = 12,
                 margin: float = 1.0, pool: int = 8, confirm: int | None = None,
                 depth: int = 2,
                 num_inference_steps: int = SAMPLING.steps, guidance_scale: float = SAMPLING.guidance_scale,
                 threshold: float | None = None, batch_size: int = 32,
                 criterion: str | None = None) -> None:
        from diffmem.models.profile import copy_criterion
        from diffmem.similarity.index import load_index

        if seeds < 1 or max_checks < 1 or batch_size < 1 or depth < 1:
            raise ConfigError("edit verification needs seeds, max_checks, depth and batch_size "
                              ">= 1")
        self.depth = int(depth)
        if not margin >= 1:
            raise ConfigError(f"edit verification margin must be >= 1, got {margin}")
        self.margin = float(margin)
        self.index = load_index(index, what="edit verification",
                                missing="edit verification needs the training set's index "
                                        "(build it with `diffmem index build`)")
        self.criterion = self.index.embedder.criterion
        self.higher_is_better = bool(self.index.embedder.higher_is_better)
        self.threshold = (copy_criterion(self.criterion).threshold
                               if threshold is None else float(threshold))
        self.seeds, self.seed, self.max_checks = int(seeds), int(seed), int(max_checks)
        self.pool = max(int(pool), self.seeds)
        spare = self.pool - self.seeds
        if confirm is not None and confirm < 0:
            raise ConfigError(f"edit verification confirm must be >= 0, got {confirm}")
        self.confirm = spare if confirm is None else min(int(confirm), spare)
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.batch_size = int(batch_size)
        self._expected = criterion
        self.generated = 0  # images generated so far (pool and checks)

    def settings(self) -> dict:
        return {"seeds": self.seeds, "seed": self.seed, "pool": self.pool,
                "confirm": self.confirm, "max_checks": self.max_checks, "depth": self.depth,
                "margin": self.margin,
                "criterion": self.criterion, "threshold": self.threshold,
                "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance_scale}

    def select_seeds(self, model, prompts: Sequence[str]) -> list[list[int]]:
        """Per prompt, the ``seeds + confirm`` seeds of the pool under which its generations come
        closest to a training image, closest first (the first ``seeds`` when ``pool == seeds``).
        :meth:`__call__` checks an edit on the first ``seeds`` of them, then confirms a pass on
        the rest."""
        if self.pool <= self.seeds:
            return [[self.seed + g for g in range(self.seeds)] for _ in prompts]
        pool = [self.seed + g for g in range(self.pool)]
        scores, _ = self._search(model, [(i, s) for i in range(len(prompts)) for s in pool],
                                 prompts)
        out = []
        for i in range(len(prompts)):
            s = torch.tensor(scores[i * self.pool : (i + 1) * self.pool])
            order = s.argsort(descending=self.higher_is_better)[: self.seeds + self.confirm]
            out.append([pool[int(k)] for k in order])
        return out

    def _search(self, model, jobs: list[tuple[int, int]], prompts: Sequence[str]):
        """Generate the (prompt index, seed) jobs in batches; nearest-item scores and ids."""
        from diffmem.core.sampling import sample, seeded_generators
        from diffmem.models.adapter import load_adapter
        from diffmem.similarity.index_compat import check_index_model_once

        adapter = load_adapter(model)
        check_index_model_once(self.index, adapter, criterion=self._expected,
                               who="edit verification")
        scores, ids = [], []
        for k in range(0, len(jobs), self.batch_size):
            chunk = jobs[k : k + self.batch_size]
            with torch.no_grad():
                res = sample(adapter, [prompts[i] for i, _ in chunk],
                             num_inference_steps=self.num_inference_steps,
                             guidance_scale=self.guidance_scale,
                             generator=seeded_generators([s for _, s in chunk], adapter.device))
            found = self.index.search(res.images.float().cpu(), k=1)
            self.generated += len(chunk)
            scores += [float(s) for s in found.scores[:, 0]]
            ids += [row[0] for row in found.ids]
        return scores, ids

    def __call__(self, model, prompts: Sequence[str],
                 seeds: Sequence[Sequence[int]] | None = None) -> list[Verdict]:
        """One :class:`Verdict` per prompt, batched. ``seeds``: per prompt, the seeds to
        generate it with (default: ``seed`` .. ``seed + self.seeds - 1``); the first ``seeds``
        of them are checked first, and the rest (as :meth:`select_seeds` gives them) only for
        the prompts that pass there."""
        if seeds is None:
            seeds = [[self.seed + g for g in range(self.seeds)] for _ in prompts]
        seeds = [[int(s) for s in own] for own in seeds]
        first = self._judge(model, prompts, [own[: self.seeds] for own in seeds])
        again = [i for i, v in enumerate(first) if v.passed and len(seeds[i]) > self.seeds]
        if not again:
            return first
        more = self._judge(model, [prompts[i] for i in again],
                           [seeds[i][self.seeds :] for i in again])
        out = list(first)
        for i, v in zip(again, more, strict=True):
            out[i] = self._merge(first[i], v)
        return out

    @property
    def _criterion(self) -> CopyCriterion:
        return CopyCriterion(self.criterion, self.threshold, higher_is_copy=self.higher_is_better)

    def _closer(self, a: float, b: float) -> bool:
        return self._criterion.closer(a, b)

    def _merge(self, a: Verdict, b: Verdict) -> Verdict:
        near = b if self._closer(b.score, a.score) else a
        return Verdict(a.copies + b.copies, a.generations + b.generations, near.nearest_id,
                       near.score, a.passed and b.passed)

    def _judge(self, model, prompts: Sequence[str],
               seeds: Sequence[Sequence[int]]) -> list[Verdict]:
        jobs = [(i, s) for i in range(len(prompts)) for s in seeds[i]]
        scores, ids = self._search(model, jobs, prompts)
        out, start = [], 0
        for own in seeds:  # the jobs of prompt i are contiguous, in its seeds' order
            s = torch.tensor(scores[start : start + len(own)])
            copy = self._criterion.copies(s)
            best = int(s.argmax() if self.higher_is_better else s.argmin())
            closest = float(s[best])
            clear = (closest < self.threshold / self.margin if self.higher_is_better
                     else closest > self.threshold * self.margin)
            out.append(Verdict(int(copy.sum()), len(own), ids[start + best], closest,
                               bool(clear and not copy.any())))
            start += len(own)
        return out

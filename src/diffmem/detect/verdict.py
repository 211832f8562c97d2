"""The verdict "copies / does not copy" of a prompt, by what the model generates.

With the training set's index at hand, every command (``explain``, the service, ``scan``) decides
by :class:`GenerationJudge`: the prompt's short preview generations
(:class:`~diffmem.detect.replication.PreviewReplication`: 4 previews of 20 steps, the default
detector of ``diffmem detect --index``) are searched in the index, and the prompt copies when its
closest preview crosses the model's copy criterion (tiled L2 < 0.15 on the testbed, SSCD cosine
> 0.5 otherwise). The first-step noise magnitude (Wen et al. 2024) stays a fast first estimate:
on hand-written prompts whose trigger sits in a long sentence it misses more than half of the
copies (docs/explanation.md), so without an index the commands say their verdict is an estimate.

A :class:`CopyVerdict` carries its evidence: the closest preview and its nearest training image
(uint8 arrays), the similarity and the criterion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from diffmem.core.sampling import sample
from diffmem.detect.replication import PreviewReplication
from diffmem.runtime.defaults import SAMPLING

__all__ = ["ESTIMATE_NOTE", "CopyVerdict", "GenerationJudge", "to_uint8"]

#: what a first-step verdict without an index says about itself
ESTIMATE_NOTE = ("first-step estimate only: it misses about a quarter of the prompts that copy "
                 "(more than half when the trigger sits in a long sentence); with the training "
                 "index (--index IDX, `diffmem index build`) the verdict comes from generated "
                 "previews searched in it")


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """One ``(3, H, W)`` image in ``[-1, 1]`` as an ``(H, W, 3)`` uint8 array."""
    from diffmem.runtime.images import to_uint8 as pixels

    return pixels(image.cpu()).permute(1, 2, 0).numpy()


@dataclass(frozen=True)
class CopyVerdict:
    """Whether a prompt's previews copy a training image, and the closest one as evidence."""

    prompt: str
    copies: bool  # the closest preview crosses the copy criterion
    margin: float  # PreviewReplication's score: > 0 copies
    similarity: float  # the closest preview's similarity (cosine) or distance (tiled L2)
    criterion: str
    copy_threshold: float
    higher_is_better: bool
    nearest_id: str
    nearest_caption: str
    seed: int  # the seed of the closest preview
    generations: int
    steps: int
    preview: np.ndarray | None = None  # (H, W, 3) uint8, the closest preview
    nearest: np.ndarray | None = None  # (H, W, 3) uint8, its nearest training image
    source: str = "generation"

    def criterion_text(self) -> str:
        """``tiled_l2 0.091 < 0.15`` (the test the closest preview passed or failed)."""
        ops = {(True, True): ">", (True, False): "<=", (False, True): "<", (False, False): ">="}
        op = ops[(bool(self.higher_is_better), bool(self.copies))]
        return f"{self.criterion} {self.similarity:.3f} {op} {self.copy_threshold:g}"

    def method(self) -> str:
        return (f"{self.generations} previews of {self.steps} steps searched in the training "
                "index")

    def to_dict(self, *, images: bool = False) -> dict:
        out = {"source": self.source, "copies": bool(self.copies), "margin": float(self.margin),
               "similarity": float(self.similarity), "criterion": self.criterion,
               "copy_threshold": float(self.copy_threshold),
               "higher_is_better": bool(self.higher_is_better), "nearest_id": self.nearest_id,
               "nearest_caption": self.nearest_caption, "seed": int(self.seed),
               "generations": int(self.generations), "steps": int(self.steps),
               "criterion_text": self.criterion_text(), "method": self.method()}
        if images:
            from diffmem.runtime.images import png_base64

            out["preview_png"] = None if self.preview is None else png_base64(self.preview)
            out["nearest_png"] = None if self.nearest is None else png_base64(self.nearest)
        return out


class GenerationJudge:
    """Decide "copies / does not copy" by preview generations searched in the training index.

    The scores are exactly :class:`PreviewReplication`'s (same seeds ``seed + g``, same
    schedule), so ``judge(model, prompts)[i].margin == PreviewReplication(index).score(model,
    prompts)[i]``; the judge also keeps each prompt's closest preview and its nearest training
    image.

    Args:
        index: a :class:`~diffmem.similarity.index.TrainingIndex` or the folder of a saved one.
        generations, num_inference_steps, seed, guidance_scale, threshold, criterion,
            batch_size: as :class:`PreviewReplication` (4 previews of 20 steps by default).
    """

    def __init__(self, index, *, generations: int = 4, num_inference_steps: int = 20,
                 seed: int = 0, guidance_scale: float = SAMPLING.guidance_scale,
                 threshold: float | None = None, criterion: str | None = None,
                 batch_size: int = 16) -> None:
        self.detector = PreviewReplication(index, threshold=threshold, criterion=criterion,
                                           num_inference_steps=num_inference_steps,
                                           generations=generations, seed=seed,
                                           guidance_scale=guidance_scale, batch_size=batch_size)
        self._expected = criterion

    @property
    def index(self):
        return self.detector.index

    def check(self, adapter, *, who: str = "the generation verdict (--index)") -> None:
        """One :class:`~diffmem.runtime.errors.ConfigError` naming the index unless it holds
        ``adapter``'s training set (called before any work, so nothing falls back silently)."""
        from diffmem.similarity.index_compat import check_index_model_once

        check_index_model_once(self.index, adapter, criterion=self._expected, who=who)

    def __call__(self, model, prompts: Sequence[str], *, evidence: bool = True
                 ) -> list[CopyVerdict]:
        """One :class:`CopyVerdict` per prompt, all previews in batched runs."""
        from diffmem.models.adapter import load_adapter, quiet_truncation

        det = self.detector
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        adapter = load_adapter(model)
        self.check(adapter)
        jobs = [(i, g) for i in range(len(prompts)) for g in range(det.generations)]
        best: dict[int, tuple] = {}
        for k in range(0, len(jobs), det.batch_size):
            chunk = jobs[k : k + det.batch_size]
            gens, latents = det._noise(adapter, chunk)
            with torch.no_grad(), quiet_truncation():
                res = sample(adapter, [prompts[i] for i, _ in chunk],
                             num_inference_steps=det.num_inference_steps,
                             guidance_scale=det.guidance_scale, generator=gens, latents=latents,
                             hooks=[det], decode=False, stop_when_done=True)
            r, name = res.records, det.name
            for j, (i, g) in enumerate(chunk):
                m = float(r[name][j])
                if i not in best or m > best[i][0]:
                    best[i] = (m, det.seed + g, r[name + "_preview"][j], int(r[name + "_row"][j]),
                               float(r[name + "_similarity"][j]), r[name + "_nearest"][j],
                               r[name + "_caption"][j])
        out = []
        for i, p in enumerate(prompts):
            m, seed, img, row, sim, nid, cap = best[i]
            near = None
            if evidence and row >= 0:
                pic = self.index.image(row)
                near = None if pic is None else to_uint8(pic)
            out.append(CopyVerdict(p, bool(m > 0), m, sim, det.criterion, det.copy_threshold,
                                   det.higher_is_better, str(nid), str(cap), seed,
                                   det.generations, det.num_inference_steps,
                                   to_uint8(img) if evidence else None, near))
        return out

    def settings(self) -> dict:
        d = self.detector
        return {"detector": d.name, "generations": d.generations,
                "num_inference_steps": d.num_inference_steps, "seed": d.seed,
                "criterion": d.criterion, "copy_threshold": d.copy_threshold}

"""Bright-ending (BE) masked noise magnitude (Chen, Liu, Shah & Xu, ICLR 2025, "Exploring Local
Memorization in Diffusion Models via Bright Ending Attention", Sec. 4; reference code
chenchen-usyd/BE-PRSS, ``detect_mem.py`` and ``local_sd_pipeline.py``).

At the LAST denoising step the cross-attention of the end token (the first EOS, position
``Tokenized.lengths - 1``) is bright exactly where a memorized image is reproduced. Its map is used
as a mask on Wen et al.'s text-conditional noise magnitude, so that a copy of only part of an image
(local memorization) is not diluted by the rest:

    m        = mean over heads and the chosen layers of A^{l,h}_{q, EOS}  at the last step,
               reshaped to the layer's h x w and resized to the latent grid        (one map per image)
    d_BE(t)  = || m * (eps(x_t, c) - eps(x_t, empty)) ||_2 / mean(m)      (m broadcast over channels)
    score    = mean of d_BE(t) over the selected steps and the generations

Layers: the reference stores the down-path cross-attention at the highest resolution (64x64 latents
in SD 1.4, ``attention_store["down_cross"]``); diffmem takes the cross-attention layers of the first
down block that has them, by name (:func:`highest_resolution_layers`). Steps: the reference tracks
the masked magnitude at every step of a full generation (50), the mask coming from a first full
run; diffmem does it in ONE run by keeping the per-step differences until the mask is known at the
last step. ``steps`` selects the steps averaged (default ``"all"``, the reference's; ``1`` = the
first step only, with the last step's mask).

Cost: a full generation (2 UNet evaluations per step, cond + uncond) per prompt and generation:
100 UNet evaluations at 50 steps, nothing extra when it runs as a hook of a generation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from diffmem.core.sampling import Run, Step
from diffmem.core.steps import StepSpec
from diffmem.detect.base import Detector
from diffmem.runtime.errors import ConfigError

_DOWN = re.compile(r"^down_blocks\.(\d+)\.")


def highest_resolution_layers(names: Sequence[str]) -> list[str]:
    """Cross-attention layers of the first down block that has any (the highest resolution with
    cross-attention); every layer when the down path has none."""
    if not names:
        raise ConfigError("the model has no cross-attention layers")
    blocks: dict[int, list[str]] = {}
    for n in names:
        m = _DOWN.match(n)
        if m:
            blocks.setdefault(int(m.group(1)), []).append(n)
    return blocks[min(blocks)] if blocks else list(names)


class BrightEnding(Detector):
    """Chen et al.'s bright-ending masked magnitude (higher = memorized).

    Parameters (besides :class:`~diffmem.detect.base.Detector`'s): ``layers`` (names or patterns;
    default :func:`highest_resolution_layers`); ``steps`` default ``"all"`` (the reference's).
    The run always goes to the last step, where the mask is read.

    Example::

        det = BrightEnding(generations=4)
        scores = det.score("testbed", ["the gargoyle origami poster"])
    """

    name = "bright_ending"

    def __init__(self, *, steps: StepSpec = "all", layers: Sequence[str] | str | None = None,
                 **options) -> None:
        super().__init__(steps=steps, **options)
        self.attention_layers = layers

    def layers(self, run: Run) -> Sequence[str] | str:
        if self.attention_layers is None:
            return highest_resolution_layers(run.adapter.cross_attention_layers())
        return self.attention_layers

    def last_step(self, run: Run) -> int:
        return len(run.timesteps) - 1  # the mask comes from the last step

    def attention_at(self, run: Run, step: Step) -> bool:
        return step.index == len(run.timesteps) - 1

    def on_start(self, run: Run) -> None:
        super().on_start(run)
        st = run.state(self)
        st.diffs = []  # (B, C, h, w) eps_c - eps_u at each selected step
        st.mask_sum = None
        st.mask_n = 0
        st.eos = (run.tokens.lengths.long() - 1).cpu()

    def on_attention(self, run: Run, step: Step, layer: str, probs: torch.Tensor) -> None:
        st = run.state(self)
        cond, idx = step.branch(probs, "cond")  # (n, heads, q, tokens)
        eos = st.eos[idx].to(cond.device)
        a = cond.float().mean(1)  # (n, q, tokens)
        a = a[torch.arange(len(idx), device=a.device), :, eos]  # (n, q)
        h, w = run.latents.shape[-2:]
        q = a.shape[-1]
        side = round((q * h / w) ** 0.5)
        if side * (q // max(side, 1)) != q:
            raise ConfigError(f"cannot lay {q} attention queries of {layer} out on a grid")
        grid = a.reshape(len(idx), 1, side, q // side)
        if grid.shape[-2:] != (h, w):
            grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
        full = torch.zeros(run.batch_size, 1, h, w, dtype=torch.float32, device=grid.device)
        full[idx.to(grid.device)] = grid
        st.mask_sum = full if st.mask_sum is None else st.mask_sum + full
        st.mask_n += 1

    def on_step(self, run: Run, step: Step) -> None:
        if self.selected(run, step):
            d = step.eps_cond.float() - step.eps_uncond.float()
            run.state(self).diffs.append(d.detach().cpu())

    def step_scores(self, run: Run, step: Step) -> torch.Tensor:  # not used: see on_end
        raise NotImplementedError("BrightEnding scores at the end of the run")

    def on_end(self, run: Run) -> None:
        st = run.state(self)
        if st.mask_sum is None or not st.diffs:
            raise RuntimeError("bright_ending needs the last step's attention and at least one "
                               "selected step; run it to the end of the schedule")
        mask = (st.mask_sum / st.mask_n).cpu()  # (B, 1, h, w)
        run.records[self.name] = masked_magnitude(torch.stack(st.diffs), mask).numpy()


def masked_magnitude(diffs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean_t || m * d_t ||_2 / mean(m)`` per image: ``diffs`` (T, B, C, h, w), ``mask``
    (B, 1, h, w) -> (B,) float64."""
    num = (diffs * mask[None]).flatten(2).norm(dim=2)  # (T, B)
    mean = mask.flatten(1).mean(1).clamp_min(torch.finfo(torch.float32).tiny)  # (B,)
    return (num / mean[None]).mean(0).double()

"""Each token's share of cross-attention and per-word spatial heat maps.

Follows the cross-attention statistics of Ren et al., "Unveiling and Mitigating Memorization in
Text-to-Image Diffusion Models through Cross Attention" (ECCV 2024,
https://arxiv.org/abs/2403.11052; reference code renjie3/MemAttn, which averages the cond branch
over query pixels): with A = softmax(Q K^T / sqrt(d)) of a cross-attention layer (queries = latent
pixels, keys = the 77 text tokens), the share of token j is

    a_j = mean over (layers, steps) of mean over (heads, pixels) of A[:, :, j]      (cond branch)

Memorized prompts concentrate this share on a few trigger tokens. Heat maps keep the pixel axis:
for every chosen layer the head-averaged map of token j is reshaped to the layer's h x w grid,
upsampled to the latent grid, and averaged over layers and steps (as in Hertz et al. 2022,
prompt-to-prompt).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from diffmem.core.sampling import Hook, Run, Step
from diffmem.core.steps import select_steps
from diffmem.explain._words import Word

__all__ = ["AttentionRecord", "AttentionShare", "word_maps", "word_shares"]


@dataclass
class AttentionRecord:
    """What :class:`AttentionShare` leaves in ``run.records["attention_share"]``."""

    share: np.ndarray  # (B, L) mean attention per token (all 77 positions, BOS included)
    maps: np.ndarray | None  # (B, L, h, w) on the latent grid, when maps were requested
    lengths: np.ndarray  # (B,) BOS + prompt tokens + first EOS


def _layer_grid(queries: int, h: int, w: int) -> tuple[int, int] | None:
    """The (h_l, w_l) grid of a layer with ``queries`` pixels whose aspect matches the latent's."""
    scale = math.sqrt(h * w / queries)
    h_l = max(1, round(h / scale))
    w_l = queries // h_l
    return (h_l, w_l) if h_l * w_l == queries else None


class AttentionShare(Hook):
    """Hook collecting each token's share of cond-branch cross-attention (Ren et al. 2024).

    Parameters:
        layers: ``"all"`` or cross-attention layer name patterns.
        steps: ``"all"``, the first ``n`` steps (int) or step indices.
        maps: also collect spatial maps per token (costs one (B, L, h, w) buffer).

    Example::

        share = AttentionShare(maps=True)
        res = sample(adapter, ["a red circle"], hooks=[share])
        record = res.records["attention_share"]
    """

    name = "attention_share"

    def __init__(self, *, layers: Sequence[str] | str = "all",
                 steps: int | Sequence[int] | str = "all", maps: bool = False) -> None:
        self.attention_layers = layers
        self.steps = steps
        self.maps = maps

    def attention_at(self, run: Run, step: Step) -> bool:
        return step.index in run.state(self).indices

    def on_start(self, run: Run) -> None:
        b, length = run.tokens.input_ids.shape
        st = run.state(self)
        st.indices = set(select_steps(self.steps, len(run.timesteps)))
        st.share = torch.zeros(b, length, dtype=torch.float64)
        st.count = torch.zeros(b, dtype=torch.float64)
        st.grid = tuple(run.latents.shape[-2:])
        st.maps = torch.zeros(b, length, *st.grid, dtype=torch.float64) if self.maps else None
        st.map_count = torch.zeros(b, dtype=torch.float64)

    def on_attention(self, run: Run, step: Step, layer: str, probs: torch.Tensor) -> None:
        st = run.state(self)
        cond, idx = step.branch(probs, "cond")
        st.share.index_add_(0, idx, cond.mean(dim=(1, 2)).double().cpu())
        st.count.index_add_(0, idx, torch.ones(len(idx), dtype=torch.float64))
        if st.maps is not None:
            self._add_map(st, cond.mean(dim=1), idx)

    @staticmethod
    def _add_map(st, per_pixel: torch.Tensor, idx: torch.Tensor) -> None:
        """Head-averaged (n, queries, L) attention -> (n, L, h, w) on the latent grid."""
        h, w = st.grid
        grid = _layer_grid(per_pixel.shape[1], h, w)
        if grid is None:
            return
        m = per_pixel.transpose(1, 2).reshape(per_pixel.shape[0], per_pixel.shape[2], *grid)
        m = F.interpolate(m.float(), size=(h, w), mode="bilinear", align_corners=False)
        st.maps.index_add_(0, idx, m.double().cpu())
        st.map_count.index_add_(0, idx, torch.ones(len(idx), dtype=torch.float64))

    def on_end(self, run: Run) -> None:
        st = run.state(self)
        share = (st.share / st.count.clamp_min(1)[:, None]).numpy()
        maps = None
        if st.maps is not None:
            maps = (st.maps / st.map_count.clamp_min(1)[:, None, None, None]).numpy()
        run.records[self.name] = AttentionRecord(share, maps, run.tokens.lengths.numpy())


def word_shares(share: np.ndarray, words: Sequence[Word]) -> np.ndarray:
    """Each word's share of the attention given to the prompt's real tokens (sums to 1).

    ``share`` is one row of :attr:`AttentionRecord.share`. BOS (which takes most of the attention in
    Stable Diffusion), EOS and padding are left out before renormalising.
    """
    raw = np.array([share[list(w.positions)].sum() for w in words], dtype=float)
    total = raw.sum()
    return raw / total if total > 0 else np.full(len(words), 1.0 / max(len(words), 1))


def word_maps(maps: np.ndarray, words: Sequence[Word], size: tuple[int, int]) -> np.ndarray:
    """Per-word heat maps ``(n_words, H, W)`` in [0, 1], upsampled to the image ``size``.

    ``maps`` is one row ``(L, h, w)`` of :attr:`AttentionRecord.maps`; a word's map is the sum of
    its tokens' maps, min-max scaled per word for display (attention over pixels is nearly flat;
    the map shows where the word attends most, not how much).
    """
    per_word = torch.stack([torch.from_numpy(maps[list(w.positions)]).sum(0) for w in words])
    up = F.interpolate(per_word[:, None].float(), size=size, mode="bilinear",
                       align_corners=False)[:, 0]
    low = up.flatten(1).amin(1)[:, None, None]
    span = (up.flatten(1).amax(1)[:, None, None] - low).clamp_min(1e-12)
    return ((up - low) / span).clamp(0, 1).numpy()

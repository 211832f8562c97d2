"""Cross-attention entropy (Ren et al., ECCV 2024, "Unveiling and Mitigating Memorization in
Text-to-image Diffusion Models through Cross Attention", Sec. 4 and the detection scores of the
authors' code, renjie3/MemAttn).

Notation (one prompt, one denoising step t, cond branch of classifier-free guidance only):
    A^{l,h}_{q,j}   cross-attention probability of query pixel q to token j, layer l, head h
    a_j             = mean_{l in layers, h, q} A^{l,h}_{q,j}     averaged over pixels, heads and
                                                                 layers BEFORE the entropy
    E_t             = - sum_{j=0}^{L-1} a_j log a_j             entropy over all L (77) tokens
    S_t             = - sum_{j >= e} a_j log a_j                "summary" entropy: partial and not
                                                                 renormalised, over the tokens from
                                                                 the first EOS (index e) onwards
    natural log, float32.

Two scores (``mode``):
    "first_step":  mean of E_t over the selected steps; default the first step only (t ~ T) and one
                   layer, the first cross-attention layer at the UNet's second-highest resolution
                   (Ren's "E" score; their code uses the second layer there, ``down_blocks.1
                   .attentions.1`` of SD 1.x).
    "late_steps":  mean_{t in last K} E_t + (mean_{t in last K} S_t - S_{first step})
                   (Ren's "D" score; K = 10 of 50 steps by default, ``steps="last:10"``), over
                   all cross-attention layers.

Direction: detectors report higher = memorized, so the score is ``sign * (E or D)``. Ren et al.'s
code reads *higher* entropy as memorized on Stable Diffusion 1.4 (``higher_entropy_memorized=True``).
On diffmem's testbed the first-step entropy is *lower* for memorized prompts (their attention
concentrates on the trigger tokens), while the late-steps score D is *higher* for them, as in Ren et
al. The defaults (:data:`HIGHER_ENTROPY_MEMORIZED`) follow these testbed measurements
(``docs/detection.md``); set the option explicitly when scoring another model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from diffmem.core.sampling import Run, Step
from diffmem.core.steps import StepSpec
from diffmem.detect.base import Detector
from diffmem.runtime.errors import ConfigError

MODES = ("first_step", "late_steps")
#: Default direction per mode, measured on the testbed (docs/detection.md). first_step: lower
#: entropy means memorized (score = -E); late_steps: higher D means memorized (score = +D, Ren's).
HIGHER_ENTROPY_MEMORIZED = {"first_step": False, "late_steps": True}
_DOWN = re.compile(r"^down_blocks\.(\d+)\.")


def default_entropy_layer(names: Sequence[str]) -> str:
    """The first cross-attention layer at the second-highest resolution, chosen by name.

    Every down block of a diffusers ``UNet2DConditionModel`` but the last halves the resolution, so
    ``down_blocks.1`` is the second-highest resolution (32x32 latents in SD 1.x/2.x). Where that
    block has no cross-attention, the next lower-resolution down block with one is used; a UNet
    without down-path cross-attention falls back to its first cross-attention layer.
    """
    if not names:
        raise ConfigError("the model has no cross-attention layers")
    by_block: dict[int, list[str]] = {}
    for name in names:
        m = _DOWN.match(name)
        if m:
            by_block.setdefault(int(m.group(1)), []).append(name)
    candidates = sorted(k for k in by_block if k >= 1)
    if candidates:
        return by_block[candidates[0]][0]
    return names[0]


def entropy(p: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``-sum_j p_j log p_j`` over the last dim (0 log 0 = 0), optionally only where ``mask``."""
    terms = -torch.special.xlogy(p.float(), p.float())
    if mask is not None:
        terms = terms * mask
    return terms.sum(-1)


def summary_mask(run: Run) -> torch.Tensor:
    """(B, L) bool: the first EOS and everything after it (the padding, whatever its id)."""
    lengths = run.tokens.lengths.to(run.cond.device)
    pos = torch.arange(run.tokens.input_ids.shape[1], device=lengths.device)
    return pos[None, :] >= (lengths - 1)[:, None]


class AttentionEntropy(Detector):
    """Ren et al.'s attention-entropy detector (higher = memorized).

    Parameters (besides :class:`~diffmem.detect.base.Detector`'s):
        mode: ``"first_step"`` (E_t averaged over the selected steps) or ``"late_steps"``
            (mean E_t over the last ``steps`` steps + summary-entropy change from the first step).
        layers: cross-attention layer names or patterns (``"down_blocks.1*"``, ``"all"``). Default:
            :func:`default_entropy_layer` for ``first_step``, every layer for ``late_steps``.
        steps: as in every detector (:mod:`diffmem.core.steps`); default ``1`` (the first step)
            for ``first_step`` and ``"last:10"`` for ``late_steps``.
        higher_entropy_memorized: ``True`` scores ``+E`` (Ren et al.'s reading on SD 1.4),
            ``False`` scores ``-E``; ``None`` takes the testbed-measured default of the mode.

    Example::

        det = AttentionEntropy(mode="first_step")
        scores = det.score("testbed", ["the gargoyle origami poster", "a cat on a sofa"])
    """

    def __init__(self, *, mode: str = "first_step", layers: Sequence[str] | str | None = None,
                 steps: StepSpec | None = None,
                 higher_entropy_memorized: bool | None = None, **options) -> None:
        if mode not in MODES:
            raise ConfigError(f"unknown attention-entropy mode {mode!r}; choose one of {MODES}")
        self.mode = mode
        self.higher_entropy_memorized = higher_entropy_memorized
        if steps is None:
            steps = 1 if mode == "first_step" else "last:10"
        super().__init__(steps=steps, **options)
        self.name = "attention_entropy" if mode == "first_step" else "attention_entropy_late"
        self.attention_layers = layers if layers is not None else (
            "all" if mode == "late_steps" else None)

    @property
    def sign(self) -> float:
        """+1 when higher entropy means memorized, -1 otherwise."""
        higher = self.higher_entropy_memorized
        if higher is None:
            higher = HIGHER_ENTROPY_MEMORIZED[self.mode]
        return 1.0 if higher else -1.0

    def layers(self, run: Run) -> Sequence[str] | str:
        if self.attention_layers is None:
            return [default_entropy_layer(run.adapter.cross_attention_layers())]
        return self.attention_layers

    # ------------------------------------------------------------------ hook
    def on_start(self, run: Run) -> None:
        super().on_start(run)
        st = run.state(self)
        st.summary = summary_mask(run)
        st.acc = None  # (B, L) sum over the layers seen at this step
        st.n_layers = torch.zeros(run.batch_size, dtype=torch.float64)
        st.mean = None
        st.summary0 = torch.zeros(run.batch_size, dtype=torch.float64)

    def attention_at(self, run: Run, step: Step) -> bool:
        first = self.mode == "late_steps" and step.index == 0
        return first or self.selected(run, step)

    def on_attention(self, run: Run, step: Step, layer: str, probs: torch.Tensor) -> None:
        st = run.state(self)
        # 1. cond branch rows, mean over heads and query pixels -> (n, L), in prompt order
        cond, idx = step.branch(probs, "cond")
        a = torch.zeros(run.batch_size, probs.shape[-1], dtype=torch.float32, device=probs.device)
        a[idx.to(a.device)] = cond.float().mean(dim=(1, 2))
        # 2. running sum over layers; the mean is taken before any entropy
        st.acc = a if st.acc is None else st.acc + a
        st.n_layers[idx] += 1

    def on_step(self, run: Run, step: Step) -> None:
        st = run.state(self)
        # 3. a_j = mean over the layers seen at this step
        st.mean = None if st.acc is None else \
            st.acc / st.n_layers.clamp_min(1).to(st.acc)[:, None]
        st.acc = None
        st.n_layers.zero_()
        if self.mode == "late_steps" and step.index == 0 and st.mean is not None:
            st.summary0 = entropy(st.mean, st.summary).double().cpu()
        super().on_step(run, step)

    def step_scores(self, run: Run, step: Step) -> torch.Tensor:
        mean = run.state(self).mean
        if mean is None:
            raise RuntimeError("no cross-attention was captured at a selected step")
        # 4. E_t (first_step) or E_t + S_t (late_steps; S_0 is subtracted in on_end)
        score = entropy(mean)
        if self.mode == "late_steps":
            score = score + entropy(mean, run.state(self).summary)
        return self.sign * score

    def on_end(self, run: Run) -> None:
        super().on_end(run)
        if self.mode == "late_steps":
            # 5. sign * (mean(E_t + S_t) over the late steps - S_0)
            summary0 = run.state(self).summary0.numpy()
            run.records[self.name] = run.records[self.name] - self.sign * summary0

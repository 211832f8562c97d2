"""Training-time loss filters: drop a sample from the loss when it shows memorization.

**Magnitude filter** (Wen et al., ICLR 2024, "Detecting, Explaining, and Mitigating Memorization in
Diffusion Models", Sec. 3.4, training-time mitigation; reference ``YuxinWenRick/
diffusion_memorization``, ``train_text_to_image.py --hard_threshold 2``). At the sample's own
training timestep t, with one extra no-grad UNet call on the empty caption:

    d_i = || eps(x_t, c_i) - eps(x_t, empty) ||_2          (eq. 4, per image, all latent elements)
    d~_i = d_i * sqrt(16384 / n)                           (n = latent elements of one image)
    drop sample i when d~_i >= threshold                   (reference threshold 2)

Normalisation: the reference takes the norm over a flattened SD 512-px latent, 4 x 64 x 64 = 16384
elements, so its threshold 2 belongs to that size. The norm of a difference whose elements are of
a given typical size grows as sqrt(n); diffmem rescales every model's d to the reference latent
size (``d~``), so the threshold means the same per-element RMS difference (2 / 128 = 0.0156) on
any resolution. The testbed's latents are 4 x 8 x 8 = 256 elements: d~ = 8 d, so threshold 2
corresponds to a raw testbed magnitude d of 0.25. v-prediction models are compared on the noise
estimate ``eps = sqrt(a_t) v + sqrt(1 - a_t) x_t``.

**Entropy filter** (Ren et al., ECCV 2024, "Unveiling and Mitigating Memorization in Text-to-image
Diffusion Models through Cross Attention", Sec. 5, training-time mitigation). The authors released
no code for it (renjie3/MemAttn has inference code only; their issue #2 asks for it), so this
follows the paper's description: during training, a sample whose cross-attention concentrates on
a few tokens (low attention entropy) is taken as being memorized and removed from the loss. At the
sample's own timestep, in the training forward pass itself (no extra UNet call), with the
attention probabilities ``A^{l,h}_{q,j}`` of the conditional prediction:

    a_j   = mean over layers l, heads h, query pixels q of A^{l,h}_{q,j}
    E_i   = - sum_j a_j log a_j                             (natural log, over all L tokens)
    drop sample i when E_i < threshold   (``direction="low"``; ``"high"``: when E_i > threshold)

Layers: by default the one layer of diffmem's first-step entropy detector
(:func:`diffmem.detect.attention_entropy.default_entropy_layer`, Ren's layer choice). The paper
gives no threshold that transfers between models; it is an option (no default), to be chosen from
the entropy distribution the training log reports (``entropy`` field, per logged step).
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Sequence

import torch

from diffmem.core.magnitude import noise_magnitude
from diffmem.runtime.defaults import SAMPLING
from diffmem.runtime.errors import ConfigError

#: latent elements of one Stable Diffusion 512-px image (4 x 64 x 64): the size Wen et al.'s
#: reference threshold belongs to
REFERENCE_LATENT_ELEMENTS = 4 * 64 * 64


def normalised_magnitude(eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """``d~`` of the module docstring: eq. 4 per image, rescaled to SD's 16384 latent elements."""
    n = eps_cond[0].numel()
    return noise_magnitude(eps_cond, eps_uncond) * math.sqrt(REFERENCE_LATENT_ELEMENTS / n)


class MagnitudeFilter:
    """Wen et al.'s training-time filter (module docstring). Needs ``uncond`` (the empty caption's
    embedding, ``(1, L, D)`` or ``(B, L, D)``) and ``unet_eval`` (the unwrapped UNet) in the step's
    context; costs one no-grad UNet call per step."""

    name = "magnitude"

    def __init__(self, threshold: float = 2.0) -> None:
        if not threshold > 0:
            raise ConfigError(f"magnitude filter threshold must be > 0, got {threshold}")
        self.threshold = float(threshold)

    def __call__(self, step, *, x_t, t, emb, pred, uncond, unet_eval, **_) -> tuple:
        with torch.no_grad():
            u = uncond.to(emb).expand(emb.shape[0], -1, -1)
            pred_u = unet_eval(x_t, t, encoder_hidden_states=u).sample
        eps_c = step.eps_from_prediction(pred.float(), x_t.float(), t)
        eps_u = step.eps_from_prediction(pred_u.float(), x_t.float(), t)
        d = normalised_magnitude(eps_c, eps_u)
        return d >= self.threshold, d


class _Collector:
    """Receives a layer's attention probabilities from diffmem's attention processors."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.count = 0

    def attention_logits(self, run, step, layer, scores):
        return scores

    def on_attention(self, run, step, layer, probs):
        a = probs.detach().float().mean(dim=(1, 2))  # (B, L): mean over heads and query pixels
        self.sum = a if self.sum is None else self.sum + a
        self.count += 1


class EntropyFilter:
    """Ren et al.'s training-time filter as the paper describes it (module docstring)."""

    name = "entropy"

    def __init__(self, threshold: float, *, direction: str = "low",
                 layers: Sequence[str] | str | None = None) -> None:
        if direction not in ("low", "high"):
            raise ConfigError(f"entropy filter direction must be 'low' or 'high', got {direction!r}")
        self.threshold = float(threshold)
        self.direction = direction
        self.layers = layers

    def _layer_names(self, unet) -> list[str]:
        from diffmem.core.attention import select_layers
        from diffmem.detect.attention_entropy import default_entropy_layer

        names = [k for k in unet.attn_processors if ".attn2." in k]
        if self.layers is None:
            return [default_entropy_layer(names)]
        return select_layers(names, self.layers)

    @contextlib.contextmanager
    def capture(self, unet, ctx: dict):
        """Route the selected layers of the training forward through diffmem's explicit
        attention processor and collect their probabilities (same output up to rounding)."""
        from diffmem.core import attention

        base = ctx.get("unet_eval", unet)
        collector = _Collector()
        ctx["_entropy_collector"] = collector
        with attention.installed(base):
            token = attention._CURRENT.set(
                (None, None, {name: [collector] for name in self._layer_names(base)}))
            try:
                yield
            finally:
                attention._CURRENT.reset(token)

    def __call__(self, step, *, emb, _entropy_collector=None, **_) -> tuple:
        from diffmem.detect.attention_entropy import entropy

        c = _entropy_collector
        if c is None or c.sum is None:
            raise RuntimeError("entropy filter: no cross-attention was captured")
        e = entropy(c.sum / c.count)
        drop = e < self.threshold if self.direction == "low" else e > self.threshold
        return drop, e


class CaptionScreen:
    """Wen et al.'s *detection* statistic screening the training captions (a diffmem variant of
    the magnitude filter above).

    Every ``every`` steps the training model scores each distinct caption of the data with the
    first-step text-conditional noise magnitude of ``diffmem detect`` (eq. 4 at the first timestep
    of the pipeline scheduler's ``num_inference_steps``-step schedule, on fixed noise of seed
    ``seed``, raw units: the number ``NoiseMagnitude(steps=1).score`` gives for that model); until
    the next screening a sample whose drawn caption is flagged is dropped from the loss (the
    caption as drawn: with MC each caption of an image is screened on its own; captions changed by
    RC/RT/CWR or dropped to "" are not). Where the magnitude filter asks "does this noisy training
    sample look memorized at its own timestep", the screen asks what the inference detector asks,
    "does this caption pull generation towards one image".

    Flagging (``relative=True``, the default): a caption is flagged when its score exceeds
    ``threshold`` times the median score of all screened captions at that screening. Fine-tuning
    moves every training caption's magnitude (on the planted benchmark an absolute threshold set
    on the base model's clean captions flagged 13, 1, 6, 452, 1, 552 and 608 of the ~620 captions
    at steps 0-300, dropping nearly all data); the ratio to the median follows that drift.
    ``threshold=None`` calibrates the ratio at the first screening as the 99th percentile of the
    scores over their median (the base model's own spread over the data, at which about 1% of the
    captions are flagged). ``relative=False``: ``threshold`` in the detector's units.

    Scores are averaged over ``generations`` fixed noises (4; with one, captions of memorized items
    fell under the ratio at some screenings of the benchmark and trained for the next ``every``
    steps). Cost: one no-grad UNet pass over ``2 x generations x captions`` rows every ``every``
    steps; only captions the sampler can draw are screened (every caption of an image with MC, its
    first otherwise). The threshold and the flagged captions of the last screening are saved
    with each checkpoint, so a resumed run drops the same samples as an uninterrupted one; every
    screening's flagged captions go to ``OUT/screen.jsonl``.
    """

    name = "screen"

    def __init__(self, threshold: float | None = None, *, relative: bool = True, every: int = 50,
                 generations: int = 4, seed: int = 0, num_inference_steps: int = SAMPLING.steps,
                 batch_size: int = 64) -> None:
        if threshold is not None and (not math.isfinite(threshold) or threshold <= 0):
            raise ConfigError(f"caption screen threshold must be a finite number > 0, got "
                              f"{threshold}")
        if threshold is None and not relative:
            raise ConfigError("an absolute caption screen needs a threshold")
        if every < 1:
            raise ConfigError(f"screen_every must be >= 1, got {every}")
        if generations < 1:
            raise ConfigError(f"screen generations must be >= 1, got {generations}")
        self.generations = int(generations)
        self.threshold = None if threshold is None else float(threshold)
        self.relative = bool(relative)
        self.every = int(every)
        self.seed = int(seed)
        self.num_inference_steps = int(num_inference_steps)
        self.batch_size = int(batch_size)
        self.flagged: set[str] = set()

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def scores(self, pipe, captions: Sequence[str]) -> torch.Tensor:
        """First-step noise magnitude of each caption under ``pipe`` (the pipeline being trained),
        averaged over ``generations`` noises: :class:`~diffmem.detect.NoiseMagnitude` itself."""
        from diffmem.detect import NoiseMagnitude
        from diffmem.runtime.progress import silent_progress

        det = NoiseMagnitude(steps=1, generations=self.generations, seed=self.seed,
                             num_inference_steps=self.num_inference_steps,
                             batch_size=self.batch_size)
        with silent_progress(), torch.no_grad():
            return torch.as_tensor(det.score(pipe, list(captions)), dtype=torch.float32)

    def screen(self, pipe, captions: Sequence[str]) -> dict:
        """Rescore ``captions`` (distinct strings) and keep those above the threshold as flagged;
        returns ``{caption: score}`` of the flagged ones (ratios to the median when relative)."""
        captions = list(dict.fromkeys(c for c in captions if c))
        s = self.scores(pipe, captions)
        if self.relative:
            s = s / s.median().clamp_min(1e-12)
        if self.threshold is None:  # calibrated once, at the first screening
            self.threshold = float(torch.quantile(s.double(), 0.99))
        hit = {c: float(v) for c, v in zip(captions, s.tolist(), strict=True)
               if v > self.threshold}
        self.flagged = set(hit)
        return hit

    def __call__(self, step, *, emb, captions=None, **_) -> tuple:
        if captions is None:
            raise RuntimeError("caption screen: the step's captions are missing from its context")
        drop = torch.tensor([c in self.flagged for c in captions], dtype=torch.bool)
        return drop, drop.float()


class LossFilter:
    """Drop the samples of a caption the model already predicts far better than the rest of the
    data at the same noise level (a diffmem method; the loss-threshold membership signal of Yeom
    et al., CSF 2018, and of Matsumoto et al., "Membership Inference Attacks against Diffusion
    Models", SPW 2023, used as a training-time loss filter in the manner of Wen et al.'s).

    A generic image cannot be recovered from a heavily noised version of it, so its denoising
    loss at a large t stays high; a sample the model is memorizing is predicted from its caption
    and its loss falls far below that of other samples at the same t. With the per-sample losses
    the training step computes anyway (no extra UNet call):

        r_i = L_i / median{ L_j : recent kept samples j in t_i's band }     (``bands`` equal bands)
        R_c = median of the last ``window`` values r_i of samples with caption c
        drop sample i when R_{c_i} < ``ratio``                              (all of its t)

    so a caption is dropped as a whole once its recent samples are predicted ``1 / ratio`` times
    better than the typical sample, and trained again if its loss rises back. The band references
    hold the last ``history`` kept losses per band (kept only, so captions being dropped do not
    pull the reference down); a band with fewer than ``min_history`` losses and a caption with
    fewer than ``min_count`` values never drop anything; samples below ``min_t`` x T (where
    every loss is small and noisy) do not enter their caption's record, but are dropped with
    their caption. The state is saved with each checkpoint (exact resume).

    Default ``ratio`` 0.5, chosen on the planted benchmark (docs/training.md): 0.35 stopped the
    planted duplicates only half-way (0.25 / 0.375 memorized on its two caption frames), 0.5 and
    0.6 at or under 0.125 on both. In a plain fine-tune the 1st percentile of the clean captions'
    median ratio lay between 0.40 and 0.75 at steps 50-600, so a few clean captions may be dropped
    for a while (``train_log.json`` lists the dropped captions).
    """

    name = "loss_ratio"  # its per-sample scores in train_log.jsonl (not the mean "loss")

    def __init__(self, ratio: float = 0.5, *, bands: int = 10, history: int = 256,
                 min_history: int = 32, window: int = 8, min_count: int = 4,
                 min_t: float = 0.1) -> None:
        if not 0 < ratio < 1:
            raise ConfigError(f"loss filter ratio must be in (0, 1), got {ratio}")
        if bands < 1 or history < 1 or window < 1 or min_count < 1 or min_history < 1:
            raise ConfigError("loss filter bands, history, window and counts must be >= 1")
        self.ratio = float(ratio)
        self.bands, self.history, self.min_history = int(bands), int(history), int(min_history)
        self.window, self.min_count, self.min_t = int(window), int(min_count), float(min_t)
        self.band_losses: list[list[float]] = [[] for _ in range(self.bands)]
        self.caption_ratios: dict[str, list[float]] = {}
        self.dropped: dict[str, int] = {}  # caption -> samples dropped

    def state_dict(self) -> dict:
        return {"band_losses": [list(b) for b in self.band_losses],
                "caption_ratios": {c: list(v) for c, v in self.caption_ratios.items()},
                "dropped": dict(self.dropped)}

    def load_state_dict(self, state: dict) -> None:
        self.band_losses = [list(b) for b in state["band_losses"]]
        self.caption_ratios = {c: list(v) for c, v in state["caption_ratios"].items()}
        self.dropped = dict(state.get("dropped", {}))

    def report(self) -> dict:
        """For ``train_log.json``: how many captions were dropped, and the most dropped ones."""
        top = sorted(self.dropped.items(), key=lambda kv: (-kv[1], kv[0]))
        return {"captions_dropped": len(self.dropped),
                "most_dropped": [{"caption": c, "samples": n} for c, n in top[:20]]}

    def _caption_ratio(self, caption: str) -> float:
        values = self.caption_ratios.get(caption, ())
        return float(statistics.median(values)) if len(values) >= self.min_count else math.inf

    def __call__(self, step, *, t, loss, captions=None, **_) -> tuple:
        if captions is None:
            raise RuntimeError("loss filter: the step's captions are missing from its context")
        n_t = step.num_train_timesteps
        band = (t.cpu().long() * self.bands // n_t).clamp(0, self.bands - 1).tolist()
        losses = loss.detach().float().cpu().tolist()
        late = [int(tt) >= self.min_t * n_t for tt in t.cpu().tolist()]
        ref = [statistics.median(b) if len(b) >= self.min_history else None
               for b in self.band_losses]
        ratios = []
        for c, b, v, use in zip(captions, band, losses, late, strict=True):
            r = v / max(ref[b], 1e-12) if ref[b] is not None else None
            ratios.append(math.nan if r is None else r)
            if r is not None and use and c:
                self.caption_ratios.setdefault(c, []).append(r)
                del self.caption_ratios[c][:-self.window]
        drop = torch.tensor([bool(c) and self._caption_ratio(c) < self.ratio for c in captions],
                            dtype=torch.bool)
        for c, b, v, d in zip(captions, band, losses, drop.tolist(), strict=True):
            if d:
                self.dropped[c] = self.dropped.get(c, 0) + 1
            else:
                self.band_losses[b].append(v)
                del self.band_losses[b][:-self.history]
        return drop, torch.tensor(ratios, dtype=torch.float32)

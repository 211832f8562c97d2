"""Testbed attribute probe: a small CNN that tells which (colour, shape) pairs an image shows.

The probe answers, for each of the testbed's ``len(COLORS) * len(SHAPES)`` (colour, shape) pairs,
"is a shape of this colour visible?" (40 independent sigmoid outputs). It is trained on freshly
rendered testbed-style scenes (:func:`sample_probe_scene`, reusing :func:`diffmem.testbed.data.render`)
that, unlike the testbed's training data, *do* contain the held-out pairs
(:data:`~diffmem.testbed.data.HELDOUT_PAIRS`), so that it can judge generations for held-out prompts.
Light blur, noise and colour-gain augmentation make it usable on a diffusion model's 64x64 outputs.

Labels come from visibility, not from the scene list: a pair is positive when at least
:attr:`ProbeConfig.min_visible` pixels of a shape of that colour remain after later shapes are drawn
over it.

The trained weights ship with diffmem (``diffmem/eval/weights/attribute_probe.safetensors``, with its
config and held-out accuracy in ``attribute_probe.json``); :func:`train_attribute_probe` reproduces
them::

    python -c "from diffmem.eval.probe import train_attribute_probe; train_attribute_probe('out')"

Input convention: float images ``(N, 3, H, W)`` in ``[-1, 1]`` (diffusers' VAE output range) or
``uint8`` ``(N, 3, H, W)``; any size is resized (bilinear, antialiased) to
:attr:`ProbeConfig.input_size`.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from diffmem.runtime.errors import ModelLoadError
from diffmem.runtime.images import to_unit_range
from diffmem.similarity.pixel import to_tensor
from diffmem.testbed import data as tb

#: Every (colour, shape) pair of the testbed vocabulary, in the order of the probe's outputs.
PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in tb.COLORS for s in tb.SHAPES)
_PAIR_INDEX = {p: i for i, p in enumerate(PAIRS)}
WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "attribute_probe.safetensors"


@dataclass
class ProbeConfig:
    """Architecture, data and training settings of the attribute probe."""

    input_size: int = 32  # images are resized to input_size x input_size before the CNN
    width: int = 16  # channels of the first conv stage; later stages use 2x and 4x
    seed: int = 1  # training stream seed (the testbed's own data uses seed 0)
    steps: int = 8000  # optimiser steps
    batch_size: int = 32
    lr: float = 3e-3  # AdamW peak learning rate, cosine decay to 0
    weight_decay: float = 1e-4
    heldout_fraction: float = 0.3  # chance that a sampled object uses a held-out pair
    min_visible: int = 12  # visible pixels (at 64x64) for a pair to count as present
    blur_max: float = 1.2  # max Gaussian blur sigma (pixels at 64x64) of the augmentation
    noise_max: float = 0.08  # max std of additive Gaussian noise in [-1, 1] units
    gain_max: float = 0.1  # max per-channel gain/offset deviation
    eval_scenes: int = 2000  # held-out evaluation scenes (seed + 1000 stream)


# --------------------------------------------------------------------------------------------
# Scenes and labels
# --------------------------------------------------------------------------------------------


def sample_probe_scene(rng: np.random.Generator, cfg: ProbeConfig | None = None,
                       res: int = tb.RESOLUTION) -> tuple[dict, np.ndarray]:
    """A generic testbed-style scene (1-4 shapes over a gradient) and its 40 presence labels.

    Like the testbed's generic scenes, but held-out (colour, shape) pairs are sampled too (with
    probability ``cfg.heldout_fraction`` per object) and object colours are jittered slightly.
    """
    cfg = cfg or ProbeConfig()
    background = tb.gradient_background(rng)
    scale = res / tb.RESOLUTION
    objects = []
    for _ in range(int(rng.integers(1, 5))):
        if rng.random() < cfg.heldout_fraction:
            color, shape = tb.HELDOUT_PAIRS[int(rng.integers(len(tb.HELDOUT_PAIRS)))]
        else:
            color, shape = PAIRS[int(rng.integers(len(PAIRS)))]
        rgb = np.clip(np.array(tb.COLORS[color], float) + rng.uniform(-12, 12, size=3), 0, 255)
        objects.append({
            "shape": shape, "color": tuple(float(v) for v in rgb), "color_name": color,
            "cx": float(rng.uniform(10, 54)) * scale, "cy": float(rng.uniform(10, 54)) * scale,
            "r": float(rng.uniform(5, 14)) * scale,
        })
    scene = {"background": background, "objects": objects}
    return scene, scene_labels(scene, res, min_visible=cfg.min_visible * scale * scale)


def scene_labels(scene: dict, res: int = tb.RESOLUTION, *, min_visible: float = 12) -> np.ndarray:
    """``(len(PAIRS),)`` float labels: 1 where a shape of that pair has ``min_visible`` visible pixels.

    Objects without a ``color_name`` (the memorized testbed images) contribute no label.
    """
    labels = np.zeros(len(PAIRS), np.float32)
    covered = np.zeros((res, res), bool)
    for obj in reversed(scene["objects"]):  # later objects are drawn on top
        mask = tb._shape_mask(obj["shape"], obj["cx"], obj["cy"], obj["r"], res)
        visible = int((mask & ~covered).sum())
        covered |= mask
        pair = (obj.get("color_name"), obj["shape"])
        if pair in _PAIR_INDEX and visible >= min_visible:
            labels[_PAIR_INDEX[pair]] = 1.0
    return labels


def render_batch(rng: np.random.Generator, n: int, cfg: ProbeConfig | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rendered scenes as ``(n, 3, 64, 64)`` floats in ``[-1, 1]`` and their labels."""
    scenes = [sample_probe_scene(rng, cfg) for _ in range(n)]
    x = to_tensor(np.stack([tb.render(s) for s, _ in scenes]))
    return x, torch.from_numpy(np.stack([y for _, y in scenes]))


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur (``sigma`` of shape ``(N,)``; 0 leaves an image as is)."""
    radius = 3
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    s = sigma.clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (offsets[None] / s) ** 2)
    k = k / k.sum(1, keepdim=True)  # (N, 7)
    n, c, h, w = x.shape
    y = F.pad(x.reshape(1, n * c, h, w), (radius,) * 4, mode="reflect")
    kk = k.repeat_interleave(c, 0)
    y = F.conv2d(y, kk[:, None, None, :], groups=n * c)
    y = F.conv2d(y, kk[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def augment(x: torch.Tensor, cfg: ProbeConfig, gen: torch.Generator) -> torch.Tensor:
    """Random blur, per-channel gain/offset and Gaussian noise on ``[-1, 1]`` images."""
    n = x.shape[0]
    x = _gaussian_blur(x, torch.rand(n, generator=gen) * cfg.blur_max)
    gain = 1 + (torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1) * cfg.gain_max
    offset = (torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1) * cfg.gain_max
    x = x * gain + offset
    noise = torch.randn(x.shape, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * cfg.noise_max
    return (x + noise).clamp(-1, 1)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def _unit_range_nchw(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` or ``[-1, 1]`` float ``(N, 3, H, W)`` images -> float32 in ``[-1, 1]``."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    return to_unit_range(images)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class AttributeProbe(nn.Module):
    """CNN: three conv stages (2x2 max-pool between), global max+mean pooling, a linear head.

    ``forward`` returns logits ``(N, len(PAIRS))``; :meth:`features` the pooled penultimate features
    ``(N, 8 * width)``; :meth:`predict_proba` sigmoid probabilities (eval mode, no gradients).
    """

    def __init__(self, cfg: ProbeConfig | None = None):
        super().__init__()
        self.cfg = cfg or ProbeConfig()
        w = self.cfg.width
        self.body = nn.Sequential(
            _block(3, w), nn.MaxPool2d(2),
            _block(w, 2 * w), nn.MaxPool2d(2),
            _block(2 * w, 4 * w), _block(4 * w, 4 * w),
        )
        self.head = nn.Linear(8 * w, len(PAIRS))

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = _unit_range_nchw(images)
        size = self.cfg.input_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        h = self.body(self._prepare(images))
        return torch.cat([h.amax((2, 3)), h.mean((2, 3))], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        self.eval()
        out = [torch.sigmoid(self(images[i : i + batch_size]))
               for i in range(0, images.shape[0], batch_size)]
        return torch.cat(out) if out else torch.zeros(0, len(PAIRS))


def save_probe(probe: AttributeProbe, out: str | Path, metrics: dict | None = None) -> Path:
    """Write ``<out>.safetensors`` and ``<out>.json`` (config, pair order, metrics)."""
    from safetensors.torch import save_file

    out = Path(out).with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in probe.state_dict().items()}
    save_file(state, str(out.with_suffix(".safetensors")))
    meta = {"config": asdict(probe.cfg), "pairs": [list(p) for p in PAIRS], "metrics": metrics or {}}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out.with_suffix(".safetensors")


def load_probe(path: str | Path | None = None) -> AttributeProbe:
    """Load a probe from ``path`` (``.safetensors`` next to its ``.json``); default: the shipped one."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise ModelLoadError(f"attribute probe weights not found: {path} and {meta_path} are needed; "
                             "train them with diffmem.eval.probe.train_attribute_probe")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if [tuple(p) for p in meta.get("pairs", [])] != list(PAIRS):
        raise ModelLoadError(f"{meta_path} was trained on another colour/shape vocabulary than "
                             "diffmem.testbed.data's; retrain it with train_attribute_probe")
    probe = AttributeProbe(ProbeConfig(**meta["config"]))
    try:
        probe.load_state_dict(load_file(str(path)))
    except (RuntimeError, OSError) as exc:
        raise ModelLoadError(f"cannot load attribute probe {path}: {exc}") from exc
    probe.metrics = meta.get("metrics", {})
    return probe.eval().requires_grad_(False)


@lru_cache(maxsize=1)
def default_probe() -> AttributeProbe:
    """The shipped probe, loaded once."""
    return load_probe(DEFAULT_WEIGHTS)


def resolve_probe(probe: str | Path | AttributeProbe | None) -> AttributeProbe:
    """A probe given as itself, as a path to its weights, or ``None`` for the shipped one."""
    if isinstance(probe, AttributeProbe):
        return probe
    return default_probe() if probe is None else load_probe(probe)


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------


def evaluate_probe(probe: AttributeProbe, n: int = 2000, *, seed: int = 1001,
                   augmented: bool = False, threshold: float = 0.5) -> dict:
    """Accuracy of ``probe`` on ``n`` freshly rendered scenes (``seed`` stream).

    Returns per-label accuracy, recall on present pairs, specificity on absent pairs, recall on
    present held-out pairs, exact-match rate (all 40 labels right) and the macro ROC AUC over pairs.
    """
    from diffmem.eval.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    x, y = render_batch(rng, n, probe.cfg)
    if augmented:
        x = augment(x, probe.cfg, torch.Generator().manual_seed(seed))
    p = probe.predict_proba(x)
    pred = (p >= threshold).float()
    pos, neg = y == 1, y == 0
    held = torch.zeros_like(y, dtype=torch.bool)
    for pair in tb.HELDOUT_PAIRS:
        held[:, _PAIR_INDEX[pair]] = True
    aucs = [roc_auc_score(y[:, j].numpy(), p[:, j].numpy())
            for j in range(len(PAIRS)) if 0 < y[:, j].sum() < n]
    return {
        "scenes": n,
        "seed": seed,
        "augmented": augmented,
        "label_accuracy": float((pred == y).float().mean()),
        "recall_present": float(pred[pos].mean()),
        "specificity_absent": float((1 - pred[neg]).mean()),
        "recall_present_heldout_pairs": float(pred[pos & held].mean()),
        "exact_match": float((pred == y).all(1).float().mean()),
        "macro_auc": float(np.mean(aucs)),
    }


def train_attribute_probe(out: str | Path | None = None, *, steps: int | None = None,
                          seed: int | None = None, cfg: ProbeConfig | None = None,
                          progress: bool = False) -> AttributeProbe:
    """Train a probe from scratch on freshly rendered scenes; deterministic for a given config.

    Args:
        out: where to save (``<out>.safetensors`` + ``<out>.json``); ``None``: do not save.
        steps, seed: override :attr:`ProbeConfig.steps` / :attr:`ProbeConfig.seed`.
        cfg: all other settings.
        progress: print the loss every 100 steps.

    The saved json records the config and :func:`evaluate_probe` on ``cfg.eval_scenes`` scenes
    from seed ``cfg.seed + 1000`` (clean and augmented).
    """
    cfg = ProbeConfig(**{**asdict(cfg or ProbeConfig()),
                         **({"steps": steps} if steps is not None else {}),
                         **({"seed": seed} if seed is not None else {})})
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    probe = AttributeProbe(cfg)
    opt = torch.optim.AdamW(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(cfg.steps, 2),
                                                pct_start=0.05)
    t0 = time.perf_counter()
    probe.train()
    for step in range(cfg.steps):
        x, y = render_batch(rng, cfg.batch_size, cfg)
        loss = F.binary_cross_entropy_with_logits(probe(augment(x, cfg, gen)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress and (step % 100 == 0 or step == cfg.steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - t0:.0f}s wall  "
                  f"{time.process_time():.0f}s cpu", flush=True)
    probe.eval().requires_grad_(False)
    if out is not None:
        metrics = {
            "clean": evaluate_probe(probe, cfg.eval_scenes, seed=cfg.seed + 1000),
            "augmented": evaluate_probe(probe, cfg.eval_scenes, seed=cfg.seed + 1000, augmented=True),
            "train_seconds": round(time.perf_counter() - t0, 1),
        }
        probe.metrics = metrics
        save_probe(probe, out, metrics)
    return probe


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z]+")


def caption_pairs(caption: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a caption names: a colour word directly followed by a shape word.

    ``"a small red circle at the left and a blue square, photo"`` -> ``[("red", "circle"),
    ("blue", "square")]``; plural shape words count (``"red circles"``); duplicates are kept once.
    """
    words = _WORD.findall(caption.lower())
    pairs: list[tuple[str, str]] = []
    for a, b in itertools.pairwise(words):
        shape = b[:-1] if b.endswith("s") and b[:-1] in tb.SHAPES else b
        if a in tb.COLORS and shape in tb.SHAPES and (a, shape) not in pairs:
            pairs.append((a, shape))
    return pairs


def pair_indices(captions: Sequence[str]) -> list[list[int]]:
    """Indices into :data:`PAIRS` of the pairs each caption names."""
    return [[_PAIR_INDEX[p] for p in caption_pairs(c)] for c in captions]

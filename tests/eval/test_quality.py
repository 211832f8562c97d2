"""Fréchet distance, its stateful form, and FID through a stand-in Inception TorchScript file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.eval.metrics import UndefinedMetricWarning
from diffmem.eval.quality import (
    FrechetDistance,
    InceptionFeatures,
    fid,
    frechet_distance,
    frechet_distance_from_stats,
    to_uint8,
)
from diffmem.runtime.errors import ModelLoadError


def _reference(a: np.ndarray, b: np.ndarray) -> float:
    """Brute force: tr sqrt(S_a S_b) from the (real, non-negative) eigenvalues of the product."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ev = np.linalg.eigvals(s_a @ s_b)
    tr_sqrt = np.sqrt(np.clip(ev.real, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)


def test_frechet_distance_matches_brute_force():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) + 0.7
    assert frechet_distance(a, b) == pytest.approx(_reference(a, b), rel=1e-8)
    assert frechet_distance(torch.from_numpy(a).float(), b) == pytest.approx(_reference(a, b), rel=1e-4)


def test_frechet_distance_of_diagonal_gaussians_has_closed_form():
    mu_a, mu_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    want = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    got = frechet_distance_from_stats(mu_a, np.diag(var_a), mu_b, np.diag(var_b))
    assert got == pytest.approx(want)


def test_frechet_distance_of_a_set_with_itself_is_zero_even_when_singular():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 20))  # rank-deficient covariance
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_stateful_frechet_distance_equals_function_over_batches():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(64, 4)), rng.normal(size=(48, 4)) * 2
    fd = FrechetDistance()
    for i in range(0, 64, 20):
        fd.update(a[i : i + 20], real=True)
    fd.update(b[:10], real=False)
    fd.update(b[10:], real=False)
    assert fd.compute() == pytest.approx(frechet_distance(a, b), rel=1e-9)
    fd.reset(keep_real=True)
    fd.update(a, real=False)
    assert fd.compute() == pytest.approx(0.0, abs=1e-9)
    fd.reset()
    with pytest.warns(UndefinedMetricWarning):
        assert np.isnan(fd.compute())
    with pytest.raises(ValueError, match="feature dimension"):
        fd.update(a, real=True)
        fd.update(a[:, :3], real=True)


class _FakeInception(torch.nn.Module):
    """Same call signature as inception-2015-12-05.pt; insists on uint8 NCHW 299x299 input."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.shape[1] != 3 or x.shape[2] != 299 or x.shape[3] != 299:
            raise ValueError("expected uint8 (N, 3, 299, 299)")
        if not return_features:
            raise ValueError("expected return_features=True")
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.float(), 8).flatten(1)  # (N, 192)
        return torch.cat([pooled] * 10 + [pooled[:, :128]], dim=1)  # (N, 2048)


def test_fid_uses_the_torchscript_inception_convention(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(_FakeInception()).save(str(path))
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(6, 3, 64, 64, generator=gen) * 2 - 1
    fake = (torch.rand(5, 3, 64, 64, generator=gen) * 2 - 1) * 0.5
    feats = InceptionFeatures(path, batch_size=4)
    f_real = feats(real)
    assert f_real.shape == (6, 2048)
    want = _FakeInception()(to_uint8(real, 299), return_features=True).float()
    torch.testing.assert_close(f_real, want)
    assert fid(real, fake, inception=path) == pytest.approx(frechet_distance(f_real, feats(fake)))
    assert fid(real, real, inception=path) == pytest.approx(0.0, abs=1e-3)


def test_missing_or_bad_inception_file_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"inception-2015-12-05\.pt"):
        InceptionFeatures(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torchscript file")
    with pytest.raises(ModelLoadError, match="cannot load Inception"):
        InceptionFeatures(bad)

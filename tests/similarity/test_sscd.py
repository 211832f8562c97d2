"""SSCD embedder: bad model files, the TorchScript path, and the ONNX-derived torch path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffmem.runtime.errors import ModelLoadError
from diffmem.similarity.sscd import SSCD, packaged_model, similarity


class _TinySSCD(nn.Module):
    """A stand-in with SSCD's structure: conv trunk, GeM pooling (p=3), linear projection."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.proj = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.conv(x)).clamp(min=1e-6)
        return self.proj(f.pow(3).mean(dim=(2, 3)).pow(1.0 / 3))


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random fields: low-resolution noise upsampled, like natural-ish images."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return nn.functional.interpolate(low, size=(size, size), mode="bicubic").clamp(-1, 1)


def test_missing_and_corrupt_files_raise_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        SSCD(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ModelLoadError, match=r"bad\.onnx"):
        SSCD(bad)
    with pytest.raises(ModelLoadError, match=r"bad\.onnx"):
        SSCD(bad, backend="torch")
    bad_pt = tmp_path / "bad.pt"
    bad_pt.write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="TorchScript"):
        SSCD(bad_pt)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_path_is_differentiable(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny.torchscript.pt"
    torch.jit.save(torch.jit.script(_TinySSCD()), str(path))
    emb = SSCD(path, size=32)
    assert emb.backend == "torch" and emb.name.startswith("tiny.torchscript/")
    x = _images(2, 48, 1).requires_grad_(True)
    e = emb(x)
    assert e.shape == (2, 16)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))
    similarity(e, emb.embed(_images(2, 48, 2))).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.testing.assert_close(emb.embed(x), e.detach())  # embed() == module(), no grad


def test_onnx_and_torch_paths_agree_and_torch_has_gradients():
    emb = SSCD(size=96, threads=1)
    assert emb.dim == 512 and emb.name.startswith("sscd/")
    x = torch.cat([_images(2, 64, 3), torch.rand(1, 3, 64, 64) * 2 - 1]).requires_grad_(True)
    ref = emb.embed(x)
    got = emb(x)
    assert similarity(ref, got.detach()).min() > 0.99
    similarity(got, ref[[1, 2, 0]]).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_distilled_model_torch_path_matches_onnx():
    emb = SSCD("sscd_distilled", size=64, threads=1)
    x = _images(3, 64, 4)
    assert similarity(emb.embed(x), emb(x)).min() > 0.999
    assert packaged_model("sscd_distilled").name == "sscd_distilled.onnx"


def test_lowpass_is_a_resize_before_the_resize_and_is_recorded():
    from torch.nn import functional as F

    from diffmem.similarity.sscd import lowpass_of

    x = _images(2, 64, 5) + 0.1 * torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    low, plain = SSCD(size=96, threads=1, lowpass=32), SSCD(size=96, threads=1)
    small = F.interpolate(x.clamp(-1, 1), size=(32, 32), mode="bilinear", antialias=True)
    torch.testing.assert_close(low.embed(x), plain.embed(small))
    assert low.preprocessing != plain.preprocessing
    assert lowpass_of(low.preprocessing) == 32 and lowpass_of(plain.preprocessing) is None
    # the differentiable path low-passes too
    xg = x.clone().requires_grad_(True)
    got = SSCD(size=96, threads=1, lowpass=32, backend="torch")(xg)
    assert similarity(low.embed(x), got.detach()).min() > 0.99
    got.sum().backward()
    assert xg.grad.abs().sum() > 0
    # an image no larger than the low-pass is left as it is
    torch.testing.assert_close(low.embed(small), plain.embed(small))


def test_lowpass_keeps_a_small_image_under_pixel_noise():
    g = torch.Generator().manual_seed(1)
    x = _images(4, 64, 6)
    noisy = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    raw, low = SSCD(threads=1), SSCD(threads=1, lowpass=32)
    s_raw = similarity(raw.embed(x), raw.embed(noisy))
    s_low = similarity(low.embed(x), low.embed(noisy))
    assert (s_low > s_raw).all()


@pytest.mark.parametrize("bad", [4, 0, 12.5])
def test_bad_lowpass_is_a_config_error(bad):
    from diffmem.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="lowpass"):
        SSCD(lowpass=bad)

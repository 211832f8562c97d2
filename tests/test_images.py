"""One conversion between [-1, 1] images and 8-bit pixels (diffmem.runtime.images), used everywhere."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor

import diffmem
from diffmem.models.adapter import ModelAdapter
from diffmem.runtime.images import to_pil, to_uint8, to_unit_range
from diffmem.similarity.index import PixelSpace, TrainingIndex
from diffmem.similarity.pixel import to_tensor
from diffmem.similarity.report import png_base64
from diffmem.similarity.sources import decode_image


def _images(n=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2.4 - 1.2  # a little out of range too


def test_every_pixel_value_round_trips():
    u8 = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert torch.equal(to_uint8(to_unit_range(u8)), u8)
    assert torch.equal(to_uint8(to_unit_range(u8.numpy())), u8)
    assert to_unit_range(u8).min() == -1 and to_unit_range(u8).max() == 1
    assert to_uint8(u8) is u8


def test_matches_diffusers_postprocess():
    x = _images()
    want = VaeImageProcessor(do_resize=False).postprocess(x, output_type="pil")
    got = to_pil(x)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, want, strict=True))
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(ModelAdapter.to_pil(x), got, strict=True))


def test_layout_helpers_and_readers_agree(tmp_path):
    x = _images()
    pils = to_pil(x)
    expected = to_unit_range(to_uint8(x))
    assert torch.equal(to_tensor(pils), expected)
    assert torch.equal(to_tensor(np.stack([np.asarray(p) for p in pils])), expected)
    assert torch.equal(to_tensor(to_uint8(x)), expected)  # a uint8 NCHW tensor is scaled too
    pils[1].save(tmp_path / "one.png")
    assert torch.equal(decode_image(tmp_path / "one.png"), expected[1])
    # the pixel index stores 8-bit pixels and gives them back in [-1, 1]
    index = TrainingIndex(PixelSpace(size=16, grid=4))
    index.add(x, ["a", "b", "c"], ["0", "1", "2"])
    assert torch.equal(index.image(2), expected[2])
    assert png_base64(x[0]).startswith("data:image/png;base64,")


def test_no_other_hand_written_conversion():
    src = Path(diffmem.__file__).parent
    pattern = re.compile(r"127\.5|/ 2 \+ 0\.5|/ 255\b")
    # sscd.to_pixels rounds straight-through for gradients: the one documented exception
    allowed = {"images.py", "sscd.py"}
    offenders = [str(p.relative_to(src)) for p in src.rglob("*.py")
                 if p.name not in allowed and pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []

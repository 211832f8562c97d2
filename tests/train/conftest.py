"""A small image-caption folder for the trainer tests (40x48 px, fitted to the model)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


def write_folder(path, n: int = 6, *, seed: int = 0, size: tuple[int, int] = (40, 48)):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path / f"img{i}.png")
        (path / f"img{i}.txt").write_text(f"a picture number {i}")
    return path


@pytest.fixture
def data_dir(tmp_path):
    return write_folder(tmp_path / "data")

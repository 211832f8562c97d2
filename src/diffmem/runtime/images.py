"""The one conversion between diffusers' image range and 8-bit pixels.

Float images are in ``[-1, 1]`` (the VAE's output range); 8-bit pixels are ``round((x + 1) * 127.5)``
after clamping, which is ``VaeImageProcessor.postprocess``'s ``(x / 2 + 0.5).clamp(0, 1) * 255``.
:func:`to_uint8` and :func:`to_unit_range` are the pair (any layout, the layout is kept); the layout
helpers :func:`to_pil` and :func:`diffmem.similarity.pixel.to_tensor` call them. (SSCD's
differentiable path, :func:`diffmem.similarity.sscd.to_pixels`, rounds straight-through instead.)
"""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` float images -> ``uint8`` pixels in ``[0, 255]``, same shape and layout; a
    ``uint8`` tensor is returned as it is."""
    if images.dtype == torch.uint8:
        return images
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_unit_range(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``uint8`` pixels (tensor or array) -> float32 in ``[-1, 1]``, same shape and layout; float
    images are taken to be in ``[-1, 1]`` already (returned as float32, clamped)."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"expected uint8 pixels, got an array of {images.dtype}")
        return torch.from_numpy(images.astype(np.float32) / 127.5 - 1)
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1
    return images.float().clamp(-1, 1)


def to_pil(images: torch.Tensor) -> list:
    """``(N, 3, H, W)`` images in ``[-1, 1]`` -> RGB PIL images (as ``VaeImageProcessor.postprocess``)."""
    from PIL import Image

    arr = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def png_base64(image: np.ndarray) -> str:
    """One ``(H, W, 3)`` uint8 image as base64 PNG (for pages and JSON answers)."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


__all__ = ["png_base64", "to_pil", "to_uint8", "to_unit_range"]

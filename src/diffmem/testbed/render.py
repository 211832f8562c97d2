"""Rendering a scene description (background and shapes) to pixels."""

from __future__ import annotations

import numpy as np

from diffmem.testbed.vocab import RESOLUTION


def _shape_mask(shape: str, cx: float, cy: float, r: float, res: int) -> np.ndarray:
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":
        # upward triangle: apex at top, base at bottom
        inside_y = (dy >= -r) & (dy <= r * 0.8)
        half_width = (dy + r) / 1.8 * 1.0
        return inside_y & (np.abs(dx) <= half_width)
    if shape == "cross":
        arm = r * 0.35
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if shape in ("hbar", "vbar"):  # thin bars (graded testbed): 1-2 px wide
        half = max(0.75, r * 0.09)
        along, across = (dx, dy) if shape == "hbar" else (dy, dx)
        return (np.abs(along) <= r) & (np.abs(across) <= half)
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: dict, res: int = RESOLUTION) -> np.ndarray:
    """Render a scene description to an ``(res, res, 3)`` uint8 image."""
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) / res
    bg = scene["background"]
    if bg["kind"] == "flat":
        img = np.empty((res, res, 3), np.float32)
        img[:] = bg["color"]
        shade = bg.get("shade", 0.0)
        img *= (1.0 + shade * (yy - 0.5))[..., None]
    elif bg["kind"] == "gradient":
        a, b = np.array(bg["color"], np.float32), np.array(bg["color2"], np.float32)
        ang = bg["angle"]
        u = np.clip(np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5) + 0.5, 0, 1)[..., None]
        img = a * (1 - u) + b * u
    elif bg["kind"] == "stripes":
        a, b = np.array(bg["color"], np.float32), np.array(bg["color2"], np.float32)
        ang, period = bg["angle"], bg["period"]
        u = (np.cos(ang) * xx + np.sin(ang) * yy) * res / period
        img = np.where(((np.floor(u) % 2) == 0)[..., None], a, b)
    elif bg["kind"] == "checker":
        a, b = np.array(bg["color"], np.float32), np.array(bg["color2"], np.float32)
        cell = bg["period"]
        u = (np.floor(xx * res / cell) + np.floor(yy * res / cell)) % 2
        img = np.where((u == 0)[..., None], a, b)
    else:
        raise ValueError(f"unknown background kind {bg['kind']!r}")
    for obj in scene["objects"]:
        mask = _shape_mask(obj["shape"], obj["cx"], obj["cy"], obj["r"], res)
        img[mask] = obj["color"]
    return np.clip(img, 0, 255).astype(np.uint8)

"""Library side of ``diffmem eval alignment`` and ``diffmem eval quality``: folders in, JSON out."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from diffmem.runtime.errors import ConfigError
from diffmem.runtime.jsonio import write_json


def read_captioned_images(folder: str | Path) -> tuple[list[torch.Tensor], list[str], list[str]]:
    """Images and captions of a ``diffmem generate`` folder (``generations.jsonl``) or of a folder of
    ``x.png`` + ``x.txt`` files. Returns ``(images in [-1, 1], captions, file names)``."""
    from diffmem.similarity.sources import decode_image, iter_folder

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of images")
    listing = folder / "generations.jsonl"
    if listing.is_file():
        rows = [json.loads(line) for line in listing.read_text(encoding="utf-8").splitlines() if line]
        if not rows:
            from diffmem.runtime.errors import EmptyInputError

            raise EmptyInputError(f"{listing} lists no images")
        return ([decode_image(folder / r["file"]) for r in rows], [r["prompt"] for r in rows],
                [r["file"] for r in rows])
    items = [it for it in iter_folder(folder) if it.image is not None]
    if not items:
        from diffmem.runtime.errors import EmptyInputError

        raise EmptyInputError(f"{folder} holds no readable images")
    return [it.image for it in items], [it.caption for it in items], [it.id for it in items]


def _same_size_batches(images: list[torch.Tensor], batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Consecutive runs of equally sized images, stacked, with the index of their first image."""
    i = 0
    while i < len(images):
        j = i + 1
        while j < len(images) and j - i < batch_size and images[j].shape == images[i].shape:
            j += 1
        yield i, torch.stack(images[i:j])
        i = j


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def eval_alignment(images: str | Path, out: str | Path | None = None, *, clip: str | Path | None = None,
                   arch: str | None = None, probe: str | Path | None = None, attributes: bool = True,
                   batch_size: int = 32) -> dict:
    """CLIP score (when ``clip`` is given) and testbed attribute alignment of captioned images."""
    from diffmem.eval.alignment import attribute_alignment, clip_score, load_clip
    from diffmem.eval.probe import resolve_probe

    if clip is None and not attributes:
        raise ConfigError("nothing to measure: give a CLIP model or keep the attribute probe")
    if attributes:
        probe = resolve_probe(probe)
    tensors, captions, names = read_captioned_images(images)
    per_image = [{"file": n, "caption": c} for n, c in zip(names, captions, strict=True)]
    report: dict = {"images": len(tensors)}
    encoder = load_clip(clip, arch=arch) if clip is not None else None
    for start, batch in _same_size_batches(tensors, batch_size):
        caps = captions[start : start + batch.shape[0]]
        if encoder is not None:
            for k, s in enumerate(clip_score(batch, caps, model=encoder, reduction="none").tolist()):
                per_image[start + k]["clip_score"] = s
        if attributes:
            for k, s in enumerate(attribute_alignment(batch, caps, probe=probe).tolist()):
                per_image[start + k]["attribute_alignment"] = _nan_to_none(s)
    if encoder is not None:
        scores = [r["clip_score"] for r in per_image]
        report["clip_score"] = sum(scores) / len(scores) if scores else None
        report["clip_model"] = str(clip)
    if attributes:
        scored = [r["attribute_alignment"] for r in per_image if r["attribute_alignment"] is not None]
        report["attribute_alignment"] = sum(scored) / len(scored) if scored else None
        report["attribute_scored"] = len(scored)
        report["attribute_unscored"] = len(per_image) - len(scored)
    report["per_image"] = per_image
    if out is not None:
        write_json(out, report)
    return report


def _testbed_images(limit: int) -> list[torch.Tensor]:
    from diffmem.similarity.pixel import to_tensor
    from diffmem.testbed import shipped_testbed_spec
    from diffmem.testbed.data import build_testbed

    out = []
    for _, image in build_testbed(shipped_testbed_spec()).images(kinds=("generic",)):
        out.append(to_tensor(image)[0])
        if len(out) >= limit:
            break
    return out


def eval_quality(real: str | Path, generated: str | Path, out: str | Path | None = None, *,
                 features: str = "sscd", inception: str | Path | None = None, max_real: int = 10000,
                 batch_size: int = 32) -> dict:
    """Fréchet distance between a real and a generated image folder (``real="testbed"``: the rendered
    generic testbed training images). ``features``: ``"inception"`` (FID), ``"sscd"`` (FSD) or
    ``"probe"`` (FPD)."""
    from diffmem.eval.quality import FrechetDistance, InceptionFeatures, ProbeFeatures, SSCDFeatures

    if features not in ("inception", "sscd", "probe"):
        raise ConfigError(f"unknown features {features!r}; use inception, sscd or probe")
    if features == "inception" and inception is None:
        raise ConfigError("FID needs --inception PATH (inception-2015-12-05.pt)")
    # read (and refuse empty) image folders before a feature model loads
    gen_images = read_captioned_images(generated)[0]
    real_images = (_testbed_images(max_real) if str(real) == "testbed"
                   else read_captioned_images(real)[0][:max_real])
    if features == "inception":
        if inception is None:
            raise ConfigError("FID needs --inception PATH (inception-2015-12-05.pt)")
        extractor = InceptionFeatures(inception, batch_size=batch_size)
    elif features == "sscd":
        extractor = SSCDFeatures()
    elif features == "probe":
        extractor = ProbeFeatures()
    else:
        raise ConfigError(f"unknown features {features!r}; use inception, sscd or probe")
    metric = FrechetDistance(extractor)
    for images, is_real in ((real_images, True), (gen_images, False)):
        for _, batch in _same_size_batches(images, batch_size):
            metric.update(batch, real=is_real)
    report = {"metric": {"inception": "fid", "sscd": "fsd", "probe": "fpd"}[features],
              "value": _nan_to_none(metric.compute()), "real": str(real), "generated": str(generated),
              "n_real": len(real_images), "n_generated": len(gen_images)}
    if out is not None:
        write_json(out, report)
    return report

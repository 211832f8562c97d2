"""The pixel testbed's index, labels by generation and copy rates (``diffmem testbed ddpm-eval``).

- :func:`build_ddpm_index`: the 208 training images in pixel space (tiled L2, 32x32, grid 4), each
  captioned ``"class:N"`` (its class: AMG's G_dup takes the neighbour's class) and counted with its
  training copies (a duplicated image: :func:`~diffmem.testbed.ddpm.duplicated_copies` generic
  ones), provenance: the training-set fingerprint of the models' profiles.
- :func:`label_generations`: one row per generation: the nearest training image, the tiled-L2
  distance, whether it is a copy (d < 0.15, the testbed's criterion) and of a duplicated item.
- :func:`measure`: plain or mitigated generation of ``n`` images (image i: seed i; class models
  cycle through the classes), labelled; the copy rate of duplicated items and the quality proxy,
  the mean tiled-L2 distance of each generation to its nearest *generic* training image (how
  close the images stay to the data that is not memorized; lower is better).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffmem.similarity.index import PixelSpace, TrainingIndex
from diffmem.testbed.ddpm import CLASSES, DDPMSpec, build_ddpm_data, ddpm_fingerprint, duplicated_copies

#: the copy criterion (``CRITERIA["tiled_l2"]``)
COPY_THRESHOLD = 0.15


def build_ddpm_index(out: str | Path | None = None, spec: DDPMSpec | None = None) -> TrainingIndex:
    spec = spec or DDPMSpec()
    data = build_ddpm_data(spec)
    dup = duplicated_copies(spec)
    index = TrainingIndex.build(
        data.images, [[f"class:{y}"] for y in data.labels], data.ids,
        PixelSpace(size=spec.resolution), copies=[dup if k == "duplicated" else 1
                                                  for k in data.kinds],
        provenance={"training_set": ddpm_fingerprint(spec)})
    if out is not None:
        index.save(out)
    return index


def label_generations(images: torch.Tensor, index: TrainingIndex, prompts, seeds) -> list[dict]:
    """Labels of generations ``(N, 3, H, W)`` in ``[-1, 1]`` (see module)."""
    found = index.search(images.float().clamp(-1, 1), k=1)
    generic = [i for i, x in enumerate(index.ids) if x.startswith("generic")]
    refs = index.references(generic)
    from diffmem.similarity.pixel import tiled_l2

    rows = []
    for j in range(images.shape[0]):
        d = float(found.scores[j, 0])
        nearest = found.ids[j][0]
        q = images[j:j + 1].float().clamp(-1, 1).expand(len(generic), -1, -1, -1)
        dg = float(tiled_l2(q, refs, grid=index.embedder.grid).min())
        rows.append({"prompt": prompts[j], "seed": int(seeds[j]), "nearest": nearest,
                     "distance": round(d, 4), "copy": d < COPY_THRESHOLD,
                     "duplicated": nearest.startswith("duplicated"),
                     "generic_distance": round(dg, 4)})
    return rows


def measure(model, index: TrainingIndex, *, n: int = 96, steps: int = 50, mitigate: str | None = None,
            scheduler: str | None = None, batch_size: int = 32, guidance_scale: float | None = None,
            out: str | Path | None = None) -> dict:
    """Copy rate and quality proxy of ``n`` generations (plain, or with ``mitigate``);
    ``guidance_scale`` None: the model's own (1 for a DDPM: no class guidance)."""
    from diffmem.core.sampling import sample, seeded_generators
    from diffmem.mitigate.registry import MitigationContext, build_mitigations
    from diffmem.models.adapter import load_adapter

    adapter = load_adapter(model, scheduler=scheduler)
    prompts = [f"class:{i % len(CLASSES)}" if adapter.class_conditional else ""
               for i in range(n)]
    hooks = (build_mitigations(mitigate, MitigationContext(adapter, index=index)) if mitigate
             else [])
    rows: list[dict] = []
    for k in range(0, n, batch_size):
        chunk = prompts[k:k + batch_size]
        seeds = list(range(k, k + len(chunk)))
        res = sample(adapter, chunk, num_inference_steps=steps, guidance_scale=guidance_scale,
                     generator=seeded_generators(seeds), hooks=hooks)
        rows += label_generations(res.images, index, chunk, seeds)
    copies = [r for r in rows if r["copy"]]
    summary = {"model": str(model), "mitigate": mitigate or "none", "images": n, "steps": steps,
               "scheduler": scheduler or type(adapter.scheduler).__name__,
               "guidance_scale": guidance_scale,
               "copy_rate": round(len(copies) / n, 4),
               "dup_copy_rate": round(sum(r["duplicated"] for r in copies) / n, 4),
               "mean_generic_distance": round(sum(r["generic_distance"] for r in rows) / n, 4)}
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return summary

"""Labels by generation: a testbed model generates each prompt from several seeds and every image is
judged by the testbed's replication criterion (:mod:`diffmem.testbed.verify`); :func:`judge` is the
rule, :class:`Judge` runs it on a model, :func:`read_broad_labels` reads a labels file (the broad
set's are written by :func:`diffmem.testbed.broad.label_broad_set`)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from diffmem.testbed import require_spec
from diffmem.testbed.data import build_testbed

#: The shipped labels (regenerate with ``diffmem testbed label --out FILE``).
LABELS_FILE = Path(__file__).parent / "broad_labels.jsonl"


def judge(distances: np.ndarray, nearest: Sequence[str], threshold: float) -> dict:
    """One prompt's label from its generations' nearest-training-image distances.

    ``copies``: how many generations are copies (distance < ``threshold``); ``memorized``:
    at least one copy; ``copied_image``: the training image copied most often (None if none).
    """
    d = np.asarray(distances, dtype=float)
    copied = d < threshold
    ids = [n for n, c in zip(nearest, copied, strict=True) if c]
    return {
        "memorized": bool(copied.any()),
        "copies": int(copied.sum()),
        "seeds": len(d),
        "copied_image": Counter(ids).most_common(1)[0][0] if ids else None,
        "min_distance": round(float(d.min()), 4),
        "distances": [round(float(x), 4) for x in d],
        "nearest": list(nearest),
    }


class Judge:
    """Labels prompts of one testbed model by generation (the criterion of ``testbed verify``)."""

    def __init__(self, model="testbed", *, seeds: int = 4, steps: int = 50,
                 guidance_scale: float = 7.5, threshold: float | None = None,
                 batch_size: int = 32, mitigate: str | None = None, index=None) -> None:
        from diffmem.models.adapter import load_adapter
        from diffmem.testbed.verify import REPLICATION_THRESHOLD, training_images, vae_roundtrip

        self.adapter = load_adapter(model)
        self.spec = require_spec(self.adapter, "labelling prompts by generation")
        self.testbed = build_testbed(self.spec)
        originals, self.ref_ids = training_images(self.testbed)
        self.refs = vae_roundtrip(self.adapter, originals)
        self.seeds, self.steps, self.guidance_scale = seeds, steps, guidance_scale
        self.threshold = REPLICATION_THRESHOLD if threshold is None else threshold
        self.batch_size = batch_size
        self.mitigate, self.run = mitigate, None
        if mitigate is not None:
            self.run = _mitigated_run(self.adapter, mitigate, index)

    def settings(self) -> dict:
        out = {"seeds": self.seeds, "steps": self.steps, "guidance_scale": self.guidance_scale,
               "threshold": self.threshold}
        return out if self.mitigate is None else {**out, "mitigate": self.mitigate}

    def __call__(self, prompts: Sequence[str]) -> list[dict]:
        """One label dict (:func:`judge`) per prompt; seed s of every prompt uses generator seed s."""
        from diffmem.similarity.pixel import nearest_tiled_l2
        from diffmem.testbed.data import LabelledPrompt
        from diffmem.testbed.verify import TILE_GRID, generate_labelled

        items = [LabelledPrompt(p, "unknown", [], []) for p in prompts]
        if self.run is None:
            images, jobs = generate_labelled(self.adapter, items, seeds=self.seeds,
                                             steps=self.steps, guidance_scale=self.guidance_scale,
                                             batch_size=self.batch_size, desc="label")
        else:  # a prompt's seeds in one call (the guard compares them with each other)
            jobs = [(i, s) for i in range(len(prompts)) for s in range(self.seeds)]
            per = max(self.seeds, self.batch_size - self.batch_size % self.seeds)
            images = torch.cat([
                self.run([prompts[i] for i, _ in jobs[k : k + per]],
                         [s for _, s in jobs[k : k + per]], steps=self.steps,
                         guidance_scale=self.guidance_scale).float().cpu()
                for k in range(0, len(jobs), per)])
        dist, nn = nearest_tiled_l2(images, self.refs, grid=TILE_GRID)
        out = []
        for i in range(len(prompts)):
            rows = [j for j, (k, _) in enumerate(jobs) if k == i]
            out.append(judge(dist[rows].numpy(), [self.ref_ids[int(nn[j])] for j in rows],
                             self.threshold))
        return out


def _mitigated_run(adapter, mitigate: str, index):
    """``run(prompts, seeds, steps=, guidance_scale=) -> images`` under the mitigation spec
    ``mitigate``: the closed-loop guard when it names ``auto``, else the methods as hooks of one
    run (AMG needs ``index``, a folder or a loaded index)."""
    from diffmem.core.sampling import sample, seeded_generators
    from diffmem.mitigate.registry import MitigationContext, build_mitigations, parse_spec
    from diffmem.similarity.index import load_index

    index = load_index(index, what="labels under a mitigation")
    if any(name == "auto" for name, _ in parse_spec(mitigate)):
        from diffmem.mitigate.guard import guard_for_spec

        guard = guard_for_spec(mitigate, adapter, index=index)
        return lambda prompts, seeds, *, steps, guidance_scale: guard.generate(
            prompts, seeds, num_inference_steps=steps, guidance_scale=guidance_scale).images
    context = MitigationContext(adapter, index=index)
    build_mitigations(mitigate, context)  # a bad spec or AMG without an index: refused now

    def run(prompts, seeds, *, steps, guidance_scale):
        return sample(adapter, prompts, generator=seeded_generators(seeds, adapter.device),
                      num_inference_steps=steps, guidance_scale=guidance_scale,
                      hooks=build_mitigations(mitigate, context)).images
    return run


def read_broad_labels(path: str | Path | None = None) -> list[dict]:
    """Rows of a labels file (default: the shipped one)."""
    from diffmem.runtime.errors import PromptError

    path = Path(path) if path is not None else LABELS_FILE
    if not path.is_file():
        raise PromptError(f"no broad labels at {path}; write them with "
                          "`diffmem testbed label --out FILE`")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]

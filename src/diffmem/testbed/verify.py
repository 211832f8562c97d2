"""Proof that the testbed memorizes: generate, then match every image to its nearest training image.

Replication criterion (Carlini et al. 2023, Sec. 4.1, tiled L2): a generation is a *copy* when its
tiled L2 distance (4x4 tiles of 16x16 px, RMS difference per tile on [-1, 1], max over tiles) to the
nearest training image *as the model's VAE renders it* (decode(encode(x).mean)) is below
``REPLICATION_THRESHOLD``. The testbed's small VAE is lossy on the complex memorized images (a
round trip alone is 0.24-0.51 from the original, 5th-95th percentile), so a perfect latent copy
can only come as close as the round trip; comparing with the round trips measures what the
diffusion model memorized. Distinct training images sit far above the threshold (1st percentile
of the nearest-other-image distance: 0.30).
The distance to the original image is reported beside it, and SSCD when the model is available.
``docs/testbed.md`` gives the measured distributions and the trade-off behind the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from diffmem.core.sampling import sample, seeded_generators
from diffmem.models.adapter import load_adapter
from diffmem.runtime.defaults import SAMPLING
from diffmem.similarity.pixel import nearest_tiled_l2, pairwise_tiled_l2, tiled_l2, to_tensor
from diffmem.testbed.data import LabelledPrompt, Testbed, build_testbed
from diffmem.testbed.locate import REPLICATION_THRESHOLD, require_spec

TRADEOFF_THRESHOLDS = (0.12, 0.15, 0.18, 0.2, 0.25)  # rates reported beside the default
TILE_GRID = 4


def training_images(testbed: Testbed) -> tuple[torch.Tensor, list[str]]:
    """All training images as a ``[-1, 1]`` tensor, with their ids."""
    ids, arrs = [], []
    for item, img in testbed.images():
        ids.append(item.image_id)
        arrs.append(img)
    return to_tensor(np.stack(arrs)), ids


@torch.no_grad()
def vae_roundtrip(adapter, images: torch.Tensor, batch_size: int = 128,
                  on_batch=None) -> torch.Tensor:
    """Training images as the model's VAE renders them: decode(encode(x).mean), in [-1, 1].
    ``on_batch(n)`` is called after each batch of ``n`` images (progress)."""
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(adapter.device, adapter.vae.dtype)
        lat = adapter.vae.encode(x).latent_dist.mean
        out.append(adapter.vae.decode(lat).sample.float().clamp(-1, 1).cpu())
        if on_batch is not None:
            on_batch(len(x))
    return torch.cat(out)


def generate_labelled(adapter, prompts: Sequence[LabelledPrompt], *, seeds: int, steps: int,
                      guidance_scale: float, batch_size: int = 64, desc: str = "generate"):
    """Images for every (prompt, seed) pair; seed s of prompt i uses generator seed ``s``."""
    from diffmem.runtime.progress import progress

    jobs = [(i, s) for i in range(len(prompts)) for s in range(seeds)]
    out = []
    with progress(len(jobs), desc, unit="img") as bar:
        for k in range(0, len(jobs), batch_size):
            chunk = jobs[k : k + batch_size]
            res = sample(adapter, [prompts[i].prompt for i, _ in chunk],
                         num_inference_steps=steps, guidance_scale=guidance_scale,
                         generator=seeded_generators([s for _, s in chunk], adapter.device))
            out.append(res.images.float().cpu())
            bar.update(len(chunk))
    return torch.cat(out), jobs


def verify_testbed(model: str | Path = "testbed", *, out: str | Path | None = None, seeds: int = 4,
                   steps: int = SAMPLING.steps, guidance_scale: float = SAMPLING.guidance_scale,
                   threshold: float = REPLICATION_THRESHOLD, with_sscd: bool = True) -> dict:
    """Generate ``seeds`` images per labelled prompt and measure replication rates per kind.

    ``model`` must be a testbed model (its data spec says which images are memorized); any other
    model is refused at once with a :class:`~diffmem.runtime.errors.ConfigError`."""
    adapter = load_adapter(model)
    testbed = build_testbed(require_spec(adapter, "testbed verify"))
    originals, ref_ids = training_images(testbed)
    refs = vae_roundtrip(adapter, originals)
    images, jobs = generate_labelled(adapter, testbed.prompts, seeds=seeds, steps=steps,
                                     guidance_scale=guidance_scale)
    dist, nn = nearest_tiled_l2(images, refs, grid=TILE_GRID)
    dist_original, _ = nearest_tiled_l2(images, originals, grid=TILE_GRID)
    copied = dist < threshold
    per_prompt: dict[int, dict] = {}
    for j, (i, _) in enumerate(jobs):
        p = testbed.prompts[i]
        rec = per_prompt.setdefault(i, {"prompt": p.prompt, "kind": p.kind, "distances": [],
                                        "nearest": [], "copies_own_image": []})
        rec["distances"].append(round(float(dist[j]), 4))
        rec["nearest"].append(ref_ids[int(nn[j])])
        rec["copies_own_image"].append(bool(copied[j]) and ref_ids[int(nn[j])] in p.image_ids)
    report: dict = {
        "criterion": f"tiled_l2(grid={TILE_GRID}) to the nearest training image's VAE round trip "
                     f"< {threshold}",
        "threshold": threshold, "seeds": seeds, "steps": steps, "guidance_scale": guidance_scale,
        "scheduler": type(adapter.scheduler).__name__, "n_training_images": len(ref_ids),
    }
    for kind in ("verbatim", "template", "heldout"):
        rows = [j for j, (i, _) in enumerate(jobs) if testbed.prompts[i].kind == kind]
        report[f"{kind}_replication_rate"] = float(copied[rows].float().mean()) if rows else None
        report[f"{kind}_distance_median"] = float(dist[rows].median()) if rows else None
        report[f"{kind}_distance_to_original_median"] = (float(dist_original[rows].median())
                                                         if rows else None)
        report[f"n_{kind}_prompts"] = len({jobs[j][0] for j in rows})
        if rows:
            report[f"{kind}_distance_percentiles_5_50_95"] = _percentiles(dist[rows])
            report[f"{kind}_distance_to_original_percentiles_5_50_95"] = _percentiles(
                dist_original[rows])
            report[f"{kind}_rate_by_threshold"] = {
                str(th): float((dist[rows] < th).float().mean()) for th in TRADEOFF_THRESHOLDS}
    memorized = [i for i, x in enumerate(ref_ids) if not x.startswith("generic")]
    report["memorized_roundtrip_to_original_percentiles_5_50_95"] = _percentiles(
        tiled_l2(refs[memorized], originals[memorized], grid=TILE_GRID))
    report["training_nn_distance_percentiles_1_5_50"] = training_nn_distances(refs)
    if with_sscd:
        sscd = _sscd_summary(images, originals, nn, jobs, testbed, adapter.profile.sscd_lowpass)
        for j, (i, _) in enumerate(jobs):  # per image, beside its distance
            for key, name in (("sscd_per_image", "sscd"), ("sscd_best_per_image", "sscd_best")):
                if key in sscd:
                    per_prompt[i].setdefault(name, []).append(sscd[key][j])
        report.update({k: v for k, v in sscd.items() if not k.endswith("_per_image")})
    report["prompts"] = list(per_prompt.values())
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        from diffmem.runtime.jsonio import write_json

        write_json(out, report)
    return report


def training_nn_distances(refs: torch.Tensor, n_queries: int = 500, seed: int = 0) -> list[float]:
    """1st / 5th / 50th percentile of the distance from a training image to its nearest *other*
    training image (round trips, ``n_queries`` random queries): how close two distinct images come,
    the floor below which a threshold separates copies from non-copies."""
    rng = np.random.default_rng(seed)
    q = rng.choice(len(refs), size=min(n_queries, len(refs)), replace=False)
    d = pairwise_tiled_l2(refs[q], refs, grid=TILE_GRID)
    d[torch.arange(len(q)), torch.as_tensor(q)] = float("inf")
    other = d.min(1).values
    return [round(float(v), 4) for v in np.percentile(other.numpy(), [1, 5, 50])]


def _percentiles(x: torch.Tensor) -> list[float]:
    return [round(float(v), 4) for v in np.percentile(x.numpy(), [5, 50, 95])]


def _sscd_summary(images, refs, nn, jobs, testbed, lowpass: int | None = None) -> dict:
    """SSCD cosine between each generation and the original of its tiled-L2 nearest training
    image, and its highest SSCD cosine to any training image (SSCD as the judge), per kind;
    ``lowpass``: the model's SSCD low-pass (its profile's ``sscd_lowpass``)."""
    try:
        from diffmem.similarity.sscd import SSCD
    except ImportError:
        return {"sscd": "unavailable (diffmem.similarity.sscd missing)"}
    try:
        model = SSCD(lowpass=lowpass)
        gen = model.embed(images)
        train = model.embed(refs)
        sim = (gen * train[nn]).sum(-1).float()
        best = (gen @ train.T).max(1).values.float()
    except Exception as e:  # SSCD is informative here, never required
        return {"sscd": f"unavailable ({type(e).__name__}: {e})"}
    out: dict = {"sscd_preprocessing": model.preprocessing, "sscd_per_image": [
        round(float(v), 4) for v in sim], "sscd_best_per_image": [round(float(v), 4) for v in best]}
    for kind in ("verbatim", "template", "heldout"):
        rows = [j for j, (i, _) in enumerate(jobs) if testbed.prompts[i].kind == kind]
        if rows:
            out[f"{kind}_sscd_mean"] = float(sim[rows].mean())
            out[f"{kind}_sscd_best_copy_rate"] = float((best[rows] > 0.5).float().mean())
    return out

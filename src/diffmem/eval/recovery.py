"""Recovery check: can a memorized image still be reached by searching the text-embedding space?

Kowalczuk et al. 2025 ("Finding Dori") show that after mitigations that edit or prune a model, a
memorized image can often still be generated from an *optimised* text embedding. This harness asks
the same question of any diffmem model and mitigation, per memorized item:

1. **Items.** A diffmem testbed: every distinct image of its memorized prompts (verbatim and
   template, :func:`~diffmem.testbed.labelled_prompts`). A ``diffmem train`` pipeline: the planted
   duplicates of its training data (``diffmem_train.json`` names the data; the planted manifest,
   ``manifest.json`` beside it, lists the items), or an explicit ``manifest``. A model with neither
   has no known memorized items and is refused (:class:`ConfigError`).
2. **Start.** Every item starts from the embedding of one neutral prompt (``start_prompt``, the
   empty prompt by default), as Finding Dori starts from neutral embeddings. It carries nothing of
   any item (with the empty prompt the conditional branch equals the unconditional one at
   iteration 0), so a recovery is the optimisation's doing; the alternative, the item's caption
   with its trigger tokens' rows replaced, keeps the caption's frame ("the ... poster"), which on
   the testbed already selects the memorized set. Iteration 0 is judged too
   (``recovered_at_start``); the BOS row stays fixed, every other row (padding included) moves.
3. **Objective** (the Dori objective): the model's denoising loss of the item's latent
   (VAE posterior mean, scaled), MSE of the eps (or v) prediction at a random timestep
   t ~ U[0, T) with fresh noise, under the conditional embedding; one batched UNet call with
   gradients per iteration over all items, Adam. With ``optimize_noise`` each generation's x_T is a
   parameter too, and the loss adds the MSE between the item's latent and the clean-latent estimate
   at the first sampling step from x_T (conditional prediction; one more UNet call); x_T is put
   back on its starting norm after every step, so it stays a plausible Gaussian draw.
4. **Judge.** At iteration 0, every ``check_every`` iterations and at the end, each item is
   generated ``seeds`` times (DDIM 50 steps, guidance 7.5, seed j for generation j) from its
   optimised embedding *under the mitigation* (hooks after :class:`~diffmem.core.hooks.SetInputs`;
   ``auto``: the guard, whose watch, verification and escalation act on these generations), and an
   item is recovered when a generation copies it: tiled L2 (grid 4) to the item's VAE rendering
   below 0.15 (the testbed criterion, :mod:`diffmem.testbed.verify`).

The report: ``recovered_share`` (items recovered at some check within the budget),
``recovered_at_start`` / ``recovered_at_end``, the budget needed (``first_recovery_iteration`` per
item; median over the recovered items), the curve of the share recovered by iteration i, and per
item its distances at every check. Text-level mitigations (rt, cwr, reanchor, ...) rewrite the
prompt text and encode it again: they replace the optimised embedding, so the check measures them
only as far as they act on the embedding given.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffmem.runtime.defaults import RECOVERY, SAMPLING
from diffmem.runtime.errors import ConfigError


@dataclass
class RecoveryItem:
    """One memorized item: its id, the caption that copies it, its training image (HxWx3 uint8)."""

    id: str
    caption: str
    image: np.ndarray


def _folder(model) -> Path | None:
    from diffmem.models.profile import named_model

    if isinstance(model, (str, Path)):
        return named_model(str(model)) or Path(model)
    return getattr(model, "path", None)


def planted_manifest(model) -> Path | None:
    """The planted manifest of a ``diffmem train`` pipeline (``manifest.json`` beside the data its
    ``diffmem_train.json`` names), or ``None``."""
    folder = _folder(model)
    record = None if folder is None else folder / "diffmem_train.json"
    if record is None or not record.is_file():
        return None
    data = Path(json.loads(record.read_text())["data"])
    manifest = (data if data.is_dir() else data.parent) / "manifest.json"
    return manifest if manifest.is_file() else None


def memorized_items(model, manifest: str | Path | None = None) -> tuple[str, list[RecoveryItem]]:
    """(where the list comes from, the items) of a model (name, folder or adapter); one
    :class:`ConfigError` when the model has no known memorized items."""
    from PIL import Image

    manifest = Path(manifest) if manifest is not None else planted_manifest(model)
    if manifest is not None:
        data = json.loads(manifest.read_text())
        if not data.get("planted"):
            raise ConfigError(f"{manifest} lists no planted items")
        items = [RecoveryItem(p["id"], p["caption"],
                              np.asarray(Image.open(manifest.parent / p["image"]).convert("RGB")))
                 for p in data["planted"]]
        return f"planted manifest {manifest}", items
    from diffmem.testbed import spec_of
    from diffmem.testbed.data import build_testbed, render
    from diffmem.testbed.locate import labelled_prompts

    spec = spec_of(model)
    if spec is None:
        raise ConfigError(f"eval recovery needs a model with known memorized items (a diffmem "
                          f"testbed, or a `diffmem train` pipeline trained on a planted set); "
                          f"{_folder(model) or model} has none")
    prompts = [p for p in labelled_prompts(spec, _folder(model)) if p.memorized]
    first: dict[str, str] = {}
    for p in prompts:
        for image_id in p.image_ids:
            first.setdefault(image_id, p.prompt)
    if not first:
        raise ConfigError(f"eval recovery: the testbed {_folder(model)} has no memorized items")
    testbed = build_testbed(spec)
    items = [RecoveryItem(i, c, render(testbed.item(i).scene, spec.resolution))
             for i, c in first.items()]
    return "testbed labelled prompts", items


def _generator_hooks(mitigate, adapter, index, threshold, seed):
    """(guard or None, hooks) of a mitigation spec (``None`` / ``"none"``: plain generation)."""
    if mitigate is None or mitigate == "none":
        return None, []
    from diffmem.mitigate.guard import guard_for_spec
    from diffmem.mitigate.registry import MitigationContext, build_mitigations, parse_spec

    parsed = parse_spec(mitigate)
    context = MitigationContext(adapter, threshold=threshold, index=index, seed=seed)
    if not any(name == "auto" for name, _ in parsed):
        return None, build_mitigations(mitigate, context)
    # as `diffmem generate --mitigate auto` builds it
    return guard_for_spec(mitigate, adapter, index=index, threshold=threshold,
                          context=context), []


class _Judge:
    """Generate every item's ``seeds`` images from given embeddings under the mitigation, measure
    the tiled L2 to the items' VAE renderings."""

    def __init__(self, adapter, refs, seeds, guard, hooks, steps, guidance_scale, batch_size):
        self.adapter, self.refs, self.seeds = adapter, refs, seeds
        self.guard, self.hooks = guard, hooks
        self.kw = {"num_inference_steps": steps, "guidance_scale": guidance_scale}
        self.batch_size = batch_size
        self.verdicts: list = []

    def __call__(self, emb: torch.Tensor, x_t: torch.Tensor | None) -> torch.Tensor:
        """(items, seeds) distances; ``emb`` one row per item, ``x_t`` one per generation."""
        from diffmem.core.hooks import SetInputs
        from diffmem.core.sampling import sample, seeded_generators
        from diffmem.similarity.pixel import tiled_l2
        from diffmem.testbed.verify import TILE_GRID

        n, s = emb.shape[0], self.seeds
        cond = emb.detach().repeat_interleave(s, dim=0)
        seeds = [j for _ in range(n) for j in range(s)]
        images, self.verdicts = [], []
        for k in range(0, n * s, self.batch_size):
            rows = slice(k, k + self.batch_size)
            xt = None if x_t is None else x_t.detach()[rows]
            prompts = [""] * len(seeds[rows])
            if self.guard is not None:
                out = self.guard.generate(prompts, seeds[rows], cond=cond[rows], latents=xt,
                                          **self.kw)
                self.verdicts += [v.status for v in out.verdicts]
                img = out.images
            else:
                img = sample(self.adapter, prompts, generator=seeded_generators(seeds[rows]),
                             hooks=[SetInputs(cond[rows], xt), *self.hooks], **self.kw).images
            images.append(img.float().clamp(-1, 1).cpu())
        dist = tiled_l2(torch.cat(images), self.refs.repeat_interleave(s, dim=0), grid=TILE_GRID)
        return dist.reshape(n, s)


def evaluate_recovery(model="testbed", *, mitigate: str | None = None, index=None,
                      threshold: float | None = None, manifest: str | Path | None = None,
                      iterations: int = RECOVERY["iterations"], lr: float = RECOVERY["lr"],
                      check_every: int = RECOVERY["check_every"], seeds: int = RECOVERY["seeds"],
                      optimize_noise: bool = False, start_prompt: str = RECOVERY["start_prompt"],
                      seed: int = RECOVERY["seed"], max_items: int | None = None,
                      steps: int = SAMPLING.steps, guidance_scale: float = SAMPLING.guidance_scale,
                      batch_size: int = 32, scheduler: str | None = None,
                      out: str | Path | None = None) -> dict:
    """The recovery report of the module docstring (written to ``out`` as JSON when given)."""
    from diffmem.core.sampling import initial_latents, seeded_generators
    from diffmem.models.adapter import load_adapter
    from diffmem.similarity.index import load_index
    from diffmem.similarity.pixel import to_tensor
    from diffmem.testbed.verify import REPLICATION_THRESHOLD, vae_roundtrip

    for name, v, low in (("iterations", iterations, 0), ("check_every", check_every, 1),
                         ("seeds", seeds, 1)):
        if int(v) != v or v < low:
            raise ConfigError(f"eval recovery: {name} must be an integer >= {low}, got {v}")
    if not lr > 0:
        raise ConfigError(f"eval recovery: lr must be > 0, got {lr}")
    source, items = memorized_items(model, manifest)  # before loading: bad input answers at once
    items = items[:max_items] if max_items else items
    t0 = time.perf_counter()
    adapter = load_adapter(model, scheduler=scheduler)
    index = load_index(index, what="eval recovery")
    guard, hooks = _generator_hooks(mitigate, adapter, index, threshold, seed)
    originals = to_tensor(np.stack([it.image for it in items]))
    refs = vae_roundtrip(adapter, originals)
    judge = _Judge(adapter, refs, seeds, guard, hooks, steps, guidance_scale, batch_size)
    dev, n = adapter.device, len(items)
    with torch.no_grad():
        vae = adapter.vae
        z0 = vae.encode(originals.to(dev, vae.dtype)).latent_dist.mean.float()
        z0 = z0 * float(vae.config.scaling_factor)
        start = adapter.encode([start_prompt]).float().expand(n, -1, -1).clone()
    emb = start.clone().requires_grad_(True)
    params = [emb]
    x_t = x_norm = t_first = None
    sched = adapter.with_scheduler()
    sched.set_timesteps(steps, device=dev)
    if optimize_noise:
        side = adapter.default_resolution
        gens = seeded_generators([j for _ in range(n) for j in range(seeds)], dev)
        with torch.no_grad():
            x_t = (initial_latents(adapter, n * seeds, side, side, gens, sched)
                   / sched.init_noise_sigma).float()
        x_t.requires_grad_(True)
        x_norm = x_t.detach().flatten(1).norm(dim=1)
        params.append(x_t)
        t_first = sched.timesteps[0]
    opt = torch.optim.Adam(params, lr=lr)
    train_sched = adapter.scheduler
    n_train = int(train_sched.config.num_train_timesteps)
    gen = torch.Generator().manual_seed(seed)
    bos = adapter.bos_index
    checks, losses = [], []
    first = [None] * n
    calls = 0

    def check(it: int) -> None:
        d = judge(emb.detach().to(adapter.dtype), x_t)
        copied = (d < REPLICATION_THRESHOLD).any(dim=1)
        for i in range(n):
            if bool(copied[i]) and first[i] is None:
                first[i] = it
        checks.append({"iteration": it, "distances": d.min(dim=1).values.tolist(),
                       "copied": copied.tolist(),
                       **({"guard": dict(Counter(judge.verdicts))} if guard is not None else {})})

    check(0)
    it = 0
    while it < iterations and not all(f is not None for f in first):
        it += 1
        t = torch.randint(0, n_train, (n,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen).to(dev)
        td = t.to(dev)
        x_noisy = train_sched.add_noise(z0, noise, td)
        target = (train_sched.get_velocity(z0, noise, td)
                  if adapter.prediction_type == "v_prediction" else noise)
        with torch.enable_grad():
            cond = emb.to(adapter.dtype)
            pred = adapter.eps(x_noisy.to(adapter.dtype), td, cond).float()
            per_item = ((pred - target) ** 2).flatten(1).mean(1)
            calls += 1
            loss = per_item.sum()
            if optimize_noise:
                x_in = sched.scale_model_input(x_t * sched.init_noise_sigma, t_first)
                rows = cond.repeat_interleave(seeds, dim=0)
                e = adapter.eps(x_in.to(adapter.dtype), t_first, rows)
                x0 = adapter.x0(x_in, t_first, e).float()
                z0r = z0.repeat_interleave(seeds, dim=0)
                loss = loss + ((x0 - z0r) ** 2).flatten(1).mean(1).sum() / seeds
                calls += 1
            opt.zero_grad(set_to_none=True)
            loss.backward()
        emb.grad[:, bos] = 0
        opt.step()
        with torch.no_grad():
            emb[:, bos] = start[:, bos]
            if x_t is not None:
                x_t.mul_((x_norm / x_t.flatten(1).norm(dim=1)).view(-1, 1, 1, 1))
        losses.append(float(per_item.detach().mean()))
        if it % check_every == 0 or it == iterations:
            check(it)
    if checks[-1]["iteration"] != it:
        check(it)
    report = _report(items, checks, first, losses, iterations, it, calls)
    report.update(model=str(adapter.path or model), mitigation=mitigate or "none",
                  index=str(getattr(index, "path", index)) if index is not None else None,
                  items_source=source, seconds=round(time.perf_counter() - t0, 1),
                  settings={"iterations": iterations, "lr": lr, "optimizer": "Adam",
                            "check_every": check_every, "seeds": seeds,
                            "optimize_noise": optimize_noise, "start_prompt": start_prompt,
                            "seed": seed, "steps": steps, "guidance_scale": guidance_scale,
                            "objective": "denoising MSE of the item's latent at t ~ U[0, T)"
                                         + (" + first-step x0 MSE from x_T" if optimize_noise
                                            else "")},
                  criterion=f"tiled_l2(grid=4) to the item's VAE rendering < "
                            f"{REPLICATION_THRESHOLD}")
    if out is not None:
        from diffmem.runtime.jsonio import write_json

        write_json(out, report)
    return report


def _report(items, checks, first, losses, budget, done, calls) -> dict:
    n = len(items)
    rec = [f for f in first if f is not None]
    curve = []
    for c in checks:
        by = sum(f is not None and f <= c["iteration"] for f in first) / n
        curve.append({"iteration": c["iteration"], "share_recovered_by": by,
                      "share_copying_now": sum(c["copied"]) / n,
                      **({"guard": c["guard"]} if "guard" in c else {})})
    per_item = []
    for i, item in enumerate(items):
        d = [c["distances"][i] for c in checks]
        per_item.append({"id": item.id, "caption": item.caption, "recovered": first[i] is not None,
                         "first_recovery_iteration": first[i], "distance_at_start": d[0],
                         "distance_at_end": d[-1], "best_distance": min(d),
                         "distances": [round(x, 4) for x in d]})
    return {"n_items": n, "recovered_share": len(rec) / n,
            "recovered_at_start": sum(checks[0]["copied"]) / n,
            "recovered_at_end": sum(checks[-1]["copied"]) / n,
            "iterations_to_recovery_median": float(np.median(rec)) if rec else None,
            "budget": budget, "iterations_done": done, "optimisation_unet_calls": calls,
            "stopped_early": done < budget, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "curve": curve, "items": per_item}

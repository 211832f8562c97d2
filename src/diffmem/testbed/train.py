"""Train the testbed pipeline: a VAE, the UNet and text encoder jointly, then the VAE decoder alone.

Training is seeded, checkpointed and resumable: rerunning the same command with the same ``--out``
continues from the last checkpoint. Accelerate places the models on a GPU when one is present.
Memorization is produced the way it arises in LAION-trained models: a small share of distinct images
is duplicated so often that they make up ``memorized_fraction`` of every batch. The UNet + text
encoder stage uses the training step of ``diffmem train`` (:mod:`diffmem.core.training`: noising, loss,
optimizer step); the VAE stages have reconstruction losses of their own.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffmem.core.training import DiffusionStep, draw_noise, optimizer_step
from diffmem.similarity.pixel import to_tensor
from diffmem.testbed.components import build_components, write_clip_tokenizer
from diffmem.testbed.data import MEMORIZED_FRACTION, Testbed, TestbedSpec, build_testbed
from diffmem.testbed.install import install_pipeline as install_pipeline  # importable from here


@dataclass
class TrainConfig:
    """Options of ``diffmem testbed train``; defaults reproduce the shipped testbed."""

    seed: int = 0
    vae_steps: int = 1500  # VAE (reconstruction + tiny KL) steps
    vae_batch_size: int = 24
    vae_lr: float = 1e-3
    unet_steps: int = 10000  # joint UNet + text-encoder steps
    batch_size: int = 48
    lr: float = 4e-4
    warmup_steps: int = 200
    memorized_fraction: float = MEMORIZED_FRACTION  # share of each batch drawn from duplicated images
    caption_dropout: float = 0.1  # empty caption, for classifier-free guidance
    checkpoint_every: int = 250  # steps between resumable checkpoints
    kl_weight: float = 1e-6
    decoder_steps: int = 3000  # decoder-only refinement on frozen encoder latents (stage 3)
    decoder_lr: float = 5e-4
    latent_channels: int = 4  # VAE latent channels (the graded testbed: 8, to keep thin shapes)
    vae_channels: str = "16,32,64,64"  # VAE block widths


#: ``diffmem testbed train --graded``: the second testbed (``testbed-graded``), memorization in
#: degrees. Another seed, its own vocabulary (``GRADED_*`` in :mod:`diffmem.testbed.graded`), items at
#: graded duplicate counts, 8 latent channels and a wider VAE so that thin shapes survive decoding;
#: sized to train in about an hour on one CPU core.
GRADED_SPEC = {"seed": 1, "n_generic": 2000, "n_verbatim": 0, "n_template": 0,
               "graded_counts": "1,2,4,8,16,32,64", "graded_items_per_count": 4}
GRADED_TRAIN = {"seed": 1, "latent_channels": 8, "vae_channels": "16,32,64,64", "vae_steps": 3000,
                "unet_steps": 8000, "batch_size": 32, "decoder_steps": 1500}


def _component_options(cfg: TrainConfig) -> dict:
    return {"latent_channels": cfg.latent_channels,
            "vae_channels": tuple(int(c) for c in cfg.vae_channels.split(","))}


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _resume(ckpt: Path, module: torch.nn.Module, opt: torch.optim.Optimizer,
            gen: torch.Generator) -> int:
    """Load a stage checkpoint (weights, optimizer, RNG) if present; return the step reached."""
    if not ckpt.exists():
        return 0
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    module.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    if "gen" in state:
        gen.set_state(state["gen"])
    return int(state["step"])


def _checkpoint(ckpt: Path, module: torch.nn.Module, opt: torch.optim.Optimizer,
                gen: torch.Generator, step: int) -> None:
    _atomic_save({"model": module.state_dict(), "opt": opt.state_dict(), "step": step,
                  "gen": gen.get_state()}, ckpt)


def _same_run(old: dict, new: dict) -> bool:
    """Whether a run folder may be resumed with new settings (only step counts may grow)."""
    steps = ("vae_steps", "unet_steps", "decoder_steps")
    old_t = {k: v for k, v in old["train"].items() if k not in steps}
    new_t = {k: v for k, v in new["train"].items() if k not in steps and k in old_t}
    return old_t == new_t and old["testbed"] == new["testbed"]


def _lr_at(step: int, cfg: TrainConfig, total: int, base: float) -> float:
    if step < cfg.warmup_steps:
        return base * (step + 1) / cfg.warmup_steps
    decay_start = int(0.8 * total)
    if step < decay_start:
        return base
    return base * max(0.1, 1.0 - 0.9 * (step - decay_start) / max(1, total - decay_start))


class _Sampler:
    """Draws (image index, caption) pairs with a fixed share of duplicated (memorized) items."""

    def __init__(self, testbed: Testbed, cfg: TrainConfig) -> None:
        kinds = [it.kind for it in testbed.items]
        self.generic = np.array([i for i, k in enumerate(kinds) if k == "generic"])
        self.memorized = np.array([i for i, k in enumerate(kinds) if k != "generic"])
        self.captions = [it.captions for it in testbed.items]
        self.cfg = cfg
        # graded testbed: every training copy is drawn as often as a generic image
        copies = np.array([it.copies for it in testbed.items], dtype=np.float64)
        self.by_copies = copies / copies.sum() if testbed.spec.counts else None

    def draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
        if self.by_copies is not None:
            idx = rng.choice(len(self.by_copies), size=n, p=self.by_copies)
            return idx, [self._caption(rng, int(i)) for i in idx]
        mem = rng.random(n) < self.cfg.memorized_fraction
        if len(self.memorized) == 0:
            mem[:] = False
        idx = np.where(mem, rng.choice(self.memorized, n) if len(self.memorized) else 0,
                       rng.choice(self.generic, n))
        return idx, [self._caption(rng, int(i)) for i in idx]

    def _caption(self, rng: np.random.Generator, i: int) -> str:
        options = self.captions[i]
        cap = options[int(rng.integers(len(options)))]
        return "" if rng.random() < self.cfg.caption_dropout else cap


def _train_vae(vae, images: torch.Tensor, cfg: TrainConfig, state_dir: Path, device,
               weights: torch.Tensor | None = None) -> None:
    """Stage 1; ``weights``: draw images with these probabilities (graded testbed: by copies)."""
    ckpt = state_dir / "vae_state.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    step = _resume(ckpt, vae, opt, gen)
    vae.train()
    bar = tqdm(total=cfg.vae_steps, initial=step, desc="vae", unit="step")
    while step < cfg.vae_steps:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg, cfg.vae_steps, cfg.vae_lr)
        idx = (torch.randint(len(images), (cfg.vae_batch_size,), generator=gen) if weights is None
               else torch.multinomial(weights, cfg.vae_batch_size, replacement=True, generator=gen))
        x = images[idx].to(device)
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + cfg.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.vae_steps:
            _checkpoint(ckpt, vae, opt, gen, step)
    bar.close()
    vae.eval()


def _refine_decoder(vae, lat_mean: torch.Tensor, lat_std: torch.Tensor, images: torch.Tensor,
                    cfg: TrainConfig, state_dir: Path, device) -> None:
    """Stage 3: train the decoder alone on the frozen encoder's latents (sharper decoding).

    The encoder, hence the latent space the UNet was trained in, is left unchanged.
    """
    ckpt = state_dir / "decoder_state.pt"
    modules = torch.nn.ModuleList([vae.decoder, vae.post_quant_conv])
    opt = torch.optim.AdamW(modules.parameters(), lr=cfg.decoder_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    step = _resume(ckpt, modules, opt, gen)
    modules.train()
    bar = tqdm(total=cfg.decoder_steps, initial=step, desc="decoder", unit="step")
    while step < cfg.decoder_steps:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg, cfg.decoder_steps, cfg.decoder_lr)
        idx = torch.randint(len(images), (cfg.vae_batch_size,), generator=gen)
        z = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)
        x = images[idx].to(device)
        rec = vae.decode(z.to(device)).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.decoder_steps:
            _checkpoint(ckpt, modules, opt, gen, step)
    bar.close()
    modules.eval()


@torch.no_grad()
def _encode_all(vae, images: torch.Tensor, device, batch: int = 64) -> tuple[torch.Tensor, ...]:
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i : i + batch].to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


def train_testbed(out: str | Path, cfg: TrainConfig | None = None,
                  spec: TestbedSpec | None = None) -> Path:
    """Train the testbed pipeline into ``out/pipeline``; resumes from ``out/state`` if present.

    Returns the pipeline folder, loadable with ``StableDiffusionPipeline.from_pretrained``.
    """
    from accelerate import Accelerator
    from transformers import CLIPTokenizer

    cfg = cfg or TrainConfig()
    spec = spec or TestbedSpec(seed=cfg.seed)
    out = Path(out)
    state_dir = out / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    settings = {"train": asdict(cfg), "testbed": spec.to_dict()}
    settings_file = out / "train_config.json"
    if settings_file.exists() and not _same_run(json.loads(settings_file.read_text()), settings):
        from diffmem.runtime.errors import ConfigError

        raise ConfigError(
            f"{out} holds a run with other settings ({settings_file}); resume it with the same "
            "options or train into a new folder"
        )
    settings_file.write_text(json.dumps(settings, indent=2))

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    torch.manual_seed(cfg.seed)
    testbed = build_testbed(spec)
    images = to_tensor(np.stack([img for _, img in testbed.images()]))
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(state_dir / "tokenizer"))
    parts = build_components(cfg.seed, **_component_options(cfg))
    vae, unet, text_encoder, scheduler = (parts[k] for k in ("vae", "unet", "text_encoder",
                                                             "scheduler"))
    vae.to(device)

    # Stage 1: the VAE, then its latent scale (SD's scaling_factor = 1 / std of latents).
    t_start = time.time()
    weights = (torch.tensor([float(it.copies) for it in testbed.items]) if spec.counts else None)
    _train_vae(vae, images, cfg, state_dir, device, weights)
    lat_mean, lat_std = _encode_all(vae, images, device)
    scaling = float(1.0 / lat_mean.std())
    vae.register_to_config(scaling_factor=scaling)
    lat_mean, lat_std = lat_mean * scaling, lat_std * scaling

    # Stage 2: UNet + text encoder, epsilon prediction with SD's noise schedule.
    ckpt = state_dir / "unet_state.pt"
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
    unet, text_encoder, opt = accelerator.prepare(unet, text_encoder, opt)
    sampler = _Sampler(testbed, cfg)
    rng = np.random.default_rng(cfg.seed + 1000)
    gen = torch.Generator().manual_seed(cfg.seed + 2000)
    if ckpt.exists() and "rng" in state:  # exact resume: same batches as an uninterrupted run
        rng.bit_generator.state = state["rng"]
        gen.set_state(state["gen"])
    # the denoising step of `diffmem train` (diffmem.core.training), without mitigations
    step_fn = DiffusionStep(scheduler)
    unet.train()
    text_encoder.train()
    bar = tqdm(total=cfg.unet_steps, initial=step, desc="unet", unit="step")
    while step < cfg.unet_steps:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg, cfg.unet_steps, cfg.lr)
        idx, caps = sampler.draw(rng, cfg.batch_size)
        idx_t = torch.from_numpy(idx)
        z0, noise, t = draw_noise(lat_mean[idx_t], lat_std[idx_t], gen,
                                  step_fn.num_train_timesteps)
        z0, noise, t = z0.to(device), noise.to(device), t.to(device)
        ids = tokenizer(caps, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        emb = text_encoder(ids)[0]
        loss = step_fn(unet, z0, noise, t, emb).loss
        optimizer_step(accelerator, loss, opt, params, max_grad_norm=1.0)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.unet_steps:
            _atomic_save({
                "unet": accelerator.unwrap_model(unet).state_dict(),
                "text_encoder": accelerator.unwrap_model(text_encoder).state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "rng": rng.bit_generator.state,
                "gen": gen.get_state(),
            }, ckpt)
    bar.close()

    # Stage 3: sharper decoding of the (unchanged) latent space.
    _refine_decoder(vae, lat_mean / scaling, lat_std / scaling, images, cfg, state_dir, device)
    target = _save_pipeline(out / "pipeline", vae, accelerator.unwrap_model(text_encoder),
                            tokenizer, accelerator.unwrap_model(unet), scheduler, spec)
    elapsed = time.time() - t_start
    (out / "train_log.json").write_text(json.dumps({
        "seconds_this_run": round(elapsed, 1), "device": str(device),
        "threads": torch.get_num_threads(), "unet_steps": cfg.unet_steps,
        "vae_steps": cfg.vae_steps}, indent=2))
    return target


def _save_pipeline(target: Path, vae, text_encoder, tokenizer, unet, scheduler,
                   spec: TestbedSpec) -> Path:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae.cpu().eval(), text_encoder=text_encoder.cpu().eval(), tokenizer=tokenizer,
        unet=unet.cpu().eval(), scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(target, safe_serialization=True)
    _compact_json(target / "tokenizer" / "tokenizer.json")
    from diffmem.testbed.components import make_portable

    make_portable(target)  # loads the same with every supported transformers / diffusers
    (target / "testbed.json").write_text(json.dumps(spec.to_dict(), indent=2))
    from diffmem.testbed import write_labelled_prompts

    write_labelled_prompts(target, spec)  # listing prompts then needs no dataset rebuild
    from diffmem.testbed.profile import write_testbed_profile

    # what lower layers know of this model, as data (clean prompts, criterion, training set)
    write_testbed_profile(target, spec)  # named "testbed" or "testbed-graded" by its spec
    return target


def _compact_json(path: Path) -> None:
    """Rewrite a JSON file without indentation (transformers indents tokenizer.json: 3.6 MB of
    CLIP vocabulary and merges instead of 1.7 MB; the shipped testbed must stay under 25 MB)."""
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def export_checkpoint(run_dir: str | Path, target: str | Path) -> Path:
    """Assemble a pipeline folder from the latest checkpoint of a (possibly unfinished) run."""
    from transformers import CLIPTokenizer

    run_dir = Path(run_dir)
    settings = json.loads((run_dir / "train_config.json").read_text())
    cfg, spec = TrainConfig(**settings["train"]), TestbedSpec(**settings["testbed"])
    parts = build_components(cfg.seed, **_component_options(cfg))
    vae = parts["vae"]
    vae.load_state_dict(torch.load(run_dir / "state" / "vae_state.pt", map_location="cpu",
                                   weights_only=False)["model"])
    decoder_ckpt = run_dir / "state" / "decoder_state.pt"
    if decoder_ckpt.exists():
        torch.nn.ModuleList([vae.decoder, vae.post_quant_conv]).load_state_dict(
            torch.load(decoder_ckpt, map_location="cpu", weights_only=False)["model"])
    vae.eval()
    testbed = build_testbed(spec)
    images = to_tensor(np.stack([img for _, img in testbed.images()]))
    lat_mean, _ = _encode_all(vae, images, torch.device("cpu"))
    vae.register_to_config(scaling_factor=float(1.0 / lat_mean.std()))
    state = torch.load(run_dir / "state" / "unet_state.pt", map_location="cpu", weights_only=False)
    parts["unet"].load_state_dict(state["unet"])
    parts["text_encoder"].load_state_dict(state["text_encoder"])
    tokenizer = CLIPTokenizer.from_pretrained(run_dir / "state" / "tokenizer")
    return _save_pipeline(Path(target), vae, parts["text_encoder"], tokenizer, parts["unet"],
                          parts["scheduler"], spec)

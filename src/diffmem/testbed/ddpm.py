"""The pixel-space testbed (``testbed-ddpm``, ``testbed-ddpm-class``): small diffusers
``UNet2DModel`` models trained on the procedural images at 32x32, saved as ``DDPMPipeline`` folders.

Data (:func:`build_ddpm_data`, a deterministic function of :class:`DDPMSpec`): ``n_generic``
generic scenes (1-4 shapes over a gradient, :func:`diffmem.testbed.scenes._generic_item`) and
``n_duplicated`` more scenes of the same kind that make up
``duplicated_fraction`` of every training batch, as LAION's duplicated images do. The class of an
image is the shape of its largest object (:data:`CLASSES`); the class-conditional model reserves
one more class, ``null_class = len(CLASSES)``, drawn with probability ``class_dropout`` in training,
for classifier-free guidance over the class (Ho & Salimans 2022).

Training (:func:`train_ddpm`) is the DDPM objective (Ho et al. 2020, eq. 14) with the cosine
schedule of iDDPM (Nichol & Dhariwal 2021), an EMA of the weights, seeded, checkpointed and
resumable: rerunning with the same ``out`` continues from the last checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffmem.similarity.pixel import to_tensor
from diffmem.testbed.render import render
from diffmem.testbed.scenes import _generic_item
from diffmem.testbed.vocab import SHAPES

#: Class of an image: the shape of its largest object.
CLASSES = tuple(SHAPES)


@dataclass(frozen=True)
class DDPMSpec:
    """The pixel testbed's data and training options; defaults reproduce the shipped models."""

    seed: int = 2
    n_generic: int = 100
    n_duplicated: int = 8
    duplicated_fraction: float = 0.4  # share of every batch drawn from the duplicated images
    resolution: int = 32
    class_conditional: bool = False
    class_dropout: float = 0.1  # null class in training (class-conditional model)
    steps: int = 8000
    batch_size: int = 16
    lr: float = 6e-4
    warmup_steps: int = 100
    ema_decay: float = 0.995
    channels: str = "32,64,64"
    checkpoint_every: int = 250

    @property
    def name(self) -> str:
        return "testbed-ddpm-class" if self.class_conditional else "testbed-ddpm"

    def data_dict(self) -> dict:
        """The fields that define the training set (its fingerprint)."""
        return {k: getattr(self, k) for k in ("seed", "n_generic", "n_duplicated", "resolution",
                                          "duplicated_fraction")}


@dataclass
class DDPMData:
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    ids: list[str]
    kinds: list[str]  # "generic" | "duplicated"
    labels: list[int]  # class per image (CLASSES)


def image_class(scene: dict) -> int:
    """The class of a scene: the shape of its largest object."""
    largest = max(scene["objects"], key=lambda o: o["r"])
    return CLASSES.index(largest["shape"])


def build_ddpm_data(spec: DDPMSpec | None = None) -> DDPMData:
    """The pixel testbed's training images, deterministically from ``spec.seed``."""
    spec = spec or DDPMSpec()
    rng = np.random.default_rng(spec.seed)
    res = spec.resolution
    scenes, ids, kinds = [], [], []
    for i in range(spec.n_generic):
        scenes.append(_generic_item(rng, i, res).scene)
        ids.append(f"generic-{i:05d}")
        kinds.append("generic")
    for i in range(spec.n_duplicated):  # generic-style scenes (a small UNet learns them fast)
        scenes.append(_generic_item(rng, spec.n_generic + i, res).scene)
        ids.append(f"duplicated-{i:03d}")
        kinds.append("duplicated")
    images = to_tensor(np.stack([render(s, res) for s in scenes]))
    return DDPMData(images, ids, kinds, [image_class(s) for s in scenes])


def duplicated_copies(spec: DDPMSpec) -> int:
    """Training copies of one duplicated image relative to one generic image."""
    f = spec.duplicated_fraction
    return max(1, round((f / spec.n_duplicated) / ((1 - f) / spec.n_generic)))


def build_unet(spec: DDPMSpec):
    """The small UNet2DModel: 32 -> 16 -> 8, convolutions only (about 0.2 s a step of 16 on one
    CPU thread), a class embedding with a null class when class-conditional."""
    from diffusers import UNet2DModel

    ch = tuple(int(c) for c in spec.channels.split(","))
    torch.manual_seed(spec.seed)
    return UNet2DModel(
        sample_size=spec.resolution, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=ch, norm_num_groups=8,
        down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3,
        num_class_embeds=len(CLASSES) + 1 if spec.class_conditional else None)


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _lr(step: int, spec: DDPMSpec) -> float:
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    start = int(0.7 * spec.steps)
    if step < start:
        return spec.lr
    return spec.lr * max(0.1, 1.0 - 0.9 * (step - start) / max(1, spec.steps - start))


def train_ddpm(out: str | Path, spec: DDPMSpec | None = None) -> Path:
    """Train into ``out/pipeline`` (a ``DDPMPipeline`` folder with its profile); resumes from
    ``out/state.pt``. Only ``steps`` may differ from the run being resumed."""
    from diffmem.runtime.errors import ConfigError

    spec = spec or DDPMSpec()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = out / "train_config.json"
    new = {k: v for k, v in asdict(spec).items() if k != "steps"}
    if settings.exists():
        old = {k: v for k, v in json.loads(settings.read_text()).items() if k != "steps"}
        if old != new:
            raise ConfigError(f"{out} holds a run with other settings ({settings}); resume it with "
                              "the same options or train into a new folder")
    settings.write_text(json.dumps(asdict(spec), indent=2))
    data = build_ddpm_data(spec)
    labels = torch.tensor(data.labels)
    unet, sched = build_unet(spec), build_scheduler()
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=spec.lr, weight_decay=0.0)
    rng = np.random.default_rng(spec.seed + 1000)
    gen = torch.Generator().manual_seed(spec.seed + 2000)
    step, ckpt = 0, out / "state.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["rng"]
        gen.set_state(state["gen"])
        step = int(state["step"])
    generic = np.array([i for i, k in enumerate(data.kinds) if k == "generic"])
    dup = np.array([i for i, k in enumerate(data.kinds) if k == "duplicated"])
    abar = sched.alphas_cumprod.float()
    t0 = time.time()
    unet.train()
    bar = tqdm(total=spec.steps, initial=step, desc="ddpm", unit="step")
    while step < spec.steps:
        for g in opt.param_groups:
            g["lr"] = _lr(step, spec)
        n = spec.batch_size
        idx = np.where(rng.random(n) < spec.duplicated_fraction, rng.choice(dup, n),
                       rng.choice(generic, n))
        idx_t = torch.from_numpy(idx)
        x0 = data.images[idx_t]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (n,), generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        y = None
        if spec.class_conditional:
            drop = torch.rand(n, generator=gen) < spec.class_dropout
            y = torch.where(drop, len(CLASSES), labels[idx_t])
        loss = F.mse_loss(unet(x_t, t, class_labels=y).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(spec.ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - d)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % spec.checkpoint_every == 0 or step == spec.steps:
            _atomic_save({"unet": unet.state_dict(), "ema": ema.state_dict(),
                          "opt": opt.state_dict(), "rng": rng.bit_generator.state,
                          "gen": gen.get_state(), "step": step}, ckpt)
    bar.close()
    log = out / "train_log.json"
    prev = json.loads(log.read_text()).get("seconds", 0.0) if log.exists() else 0.0
    log.write_text(json.dumps({"seconds": round(prev + time.time() - t0, 1), "steps": step,
                               "threads": torch.get_num_threads()}, indent=2))
    return save_ddpm_pipeline(out / "pipeline", ema.eval(), sched, spec)


def save_ddpm_pipeline(target: str | Path, unet, scheduler, spec: DDPMSpec) -> Path:
    """A ``DDPMPipeline`` folder with the pixel testbed's profile (``diffmem_profile.json``)."""
    from diffusers import DDPMPipeline

    target = Path(target)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(target, safe_serialization=True)
    (target / "testbed_ddpm.json").write_text(json.dumps(asdict(spec), indent=2))
    ddpm_profile(spec).save(target)
    return target


def ddpm_fingerprint(spec: DDPMSpec) -> str:
    """``"testbed-ddpm:<sha256[:12]>"`` of the pixel testbed's training set."""
    from diffmem.similarity.index_compat import training_set_fingerprint

    return training_set_fingerprint("testbed-ddpm", spec.data_dict())


def ddpm_profile(spec: DDPMSpec, labels: str | Path | None = None):
    """The profile of a pixel-testbed folder: tiled L2 < 0.15 in pixel space, its training set,
    its class names (``"class:circle"`` is a prompt of the class-conditional model)."""
    from diffmem.models.profile import ModelProfile

    return ModelProfile(name=spec.name, clean_prompts=(), criterion="tiled_l2",
                        training_set=ddpm_fingerprint(spec),
                        labels=Path(labels).resolve() if labels is not None else None,
                        data={"pixel_testbed": spec.data_dict(),
                              **({"classes": list(CLASSES)} if spec.class_conditional else {})})

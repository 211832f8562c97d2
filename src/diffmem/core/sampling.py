"""The sampling core: one batched denoising loop that owns classifier-free guidance and calls hooks.

Implements classifier-free guidance (Ho & Salimans 2022, eq. 6) over any diffusers scheduler:

    eps_hat = eps(x_t, empty) + w * (eps(x_t, c) - eps(x_t, empty))

At each step the loop builds a :class:`Step` (t, x_t, eps_cond, eps_uncond, guided eps, x0 estimate)
and passes it to every hook. Hooks observe it (detectors), change ``step.eps`` or
``step.guidance_scale`` (guidance terms), read or rescale cross-attention (see
:mod:`diffmem.core.attention`), or set ``run.stop`` to end the run early. Before the first step hooks
may change the prompts' embeddings or the initial noise in :meth:`Hook.on_start`.

With no hooks the result equals ``StableDiffusionPipeline(...)`` for the same seed, scheduler and
number of steps: same text encoding, initial noise, timesteps, UNet batch layout ([uncond, cond]),
scheduler step arguments and VAE decoding.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from diffmem.core.attention import AttentionSession
from diffmem.models.adapter import ModelAdapter, Tokenized


class Hook:
    """Base class of everything that plugs into :func:`sample`. Override what you need.

    Attributes:
        name: key under which :func:`sample` returns what the hook stored in ``run.records``.
        attention_layers: ``None`` (no attention access), ``"all"``, or cross-attention layer names
            or patterns (``"down_blocks.1*"``); see :func:`diffmem.core.attention.select_layers`.
    """

    name: str = "hook"
    attention_layers: Sequence[str] | str | None = None

    def on_start(self, run: Run) -> None:
        """Before the first step: may change ``run.cond``, ``run.uncond`` or ``run.latents``."""

    def on_step(self, run: Run, step: Step) -> None:
        """After the UNet call: may read the step, change ``step.eps`` / set ``run.stop``."""

    def on_end(self, run: Run) -> None:
        """After the last step (also after an early stop)."""

    def attention_at(self, run: Run, step: Step) -> bool:
        """Whether this hook needs the cross-attention at this step (only asked if it has layers)."""
        return True

    def attention_logits(self, run: Run, step: Step, layer: str,
                         scores: torch.Tensor) -> torch.Tensor:
        """Change cross-attention logits ``(2B, heads, queries, tokens)``; rows [:B] are uncond."""
        return scores

    def on_attention(self, run: Run, step: Step, layer: str, probs: torch.Tensor) -> None:
        """Observe cross-attention probabilities ``(2B, heads, queries, tokens)`` (float32)."""


@dataclass
class Run:
    """State of one batched run, shared by all hooks."""

    adapter: ModelAdapter
    prompts: list[str]
    tokens: Tokenized
    cond: torch.Tensor  # (B, L, D) conditional text embeddings
    uncond: torch.Tensor  # (B, L, D) unconditional (negative prompt) embeddings
    latents: torch.Tensor  # (B, C, h, w) current scheduler state; x_T before the first step
    scheduler: Any
    timesteps: torch.Tensor
    guidance_scale: float
    generator: torch.Generator | list[torch.Generator] | None
    records: dict[str, Any] = field(default_factory=dict)
    stop: bool = False
    steps_done: int = 0

    @property
    def batch_size(self) -> int:
        return len(self.prompts)


@dataclass
class Step:
    """What the loop knows at one denoising step. Hooks may replace ``eps`` and ``guidance_scale``."""

    index: int
    t: torch.Tensor
    x_t: torch.Tensor  # (B, C, h, w) model input (after scale_model_input)
    eps_cond: torch.Tensor | None = None
    eps_uncond: torch.Tensor | None = None
    eps: torch.Tensor | None = None  # guided prediction given to the scheduler
    guidance_scale: float | torch.Tensor = 7.5
    _adapter: ModelAdapter | None = field(default=None, repr=False)
    _x0: torch.Tensor | None = field(default=None, repr=False)

    @property
    def x0(self) -> torch.Tensor:
        """Clean-latent estimate from the *guided* prediction (computed once, on first use)."""
        if self._x0 is None:
            self._x0 = self._adapter.x0(self.x_t, self.t, self.eps)
        return self._x0

    def guide(self) -> torch.Tensor:
        """Recompute ``eps`` from the branches and ``guidance_scale`` (after a hook changed it)."""
        w = self.guidance_scale
        if isinstance(w, torch.Tensor):
            w = w.reshape(-1, *([1] * (self.eps_cond.ndim - 1))).to(self.eps_cond)
        self.eps = self.eps_uncond + w * (self.eps_cond - self.eps_uncond)
        self._x0 = None
        return self.eps


@dataclass
class SampleResult:
    """What :func:`sample` returns."""

    images: torch.Tensor | None  # (B, 3, H, W) in [-1, 1]; None when stopped early or not decoded
    latents: torch.Tensor
    records: dict[str, Any]
    steps_done: int
    stopped_early: bool
    truncated: list[bool]
    seconds: float

    def pil(self) -> list:
        if self.images is None:
            raise ValueError("this run produced no images (it stopped early or decode=False)")
        return ModelAdapter.to_pil(self.images)


def _step_kwargs(scheduler, generator, eta: float) -> dict:
    """The extra arguments ``StableDiffusionPipeline.prepare_extra_step_kwargs`` passes."""
    params = set(inspect.signature(scheduler.step).parameters)
    kw: dict = {}
    if "eta" in params:
        kw["eta"] = eta
    if "generator" in params:
        kw["generator"] = generator
    return kw


def initial_latents(adapter: ModelAdapter, batch: int, height: int, width: int, generator,
                    scheduler) -> torch.Tensor:
    """x_T exactly as ``StableDiffusionPipeline.prepare_latents`` draws it."""
    from diffusers.utils.torch_utils import randn_tensor

    f = adapter.vae_scale_factor
    shape = (batch, adapter.unet.config.in_channels, height // f, width // f)
    lat = randn_tensor(shape, generator=generator, device=adapter.device, dtype=adapter.dtype)
    return lat * scheduler.init_noise_sigma


def sample(
    adapter: ModelAdapter,
    prompts: Sequence[str],
    *,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    generator: torch.Generator | list[torch.Generator] | None = None,
    hooks: Sequence[Hook] = (),
    scheduler: str | Any | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    latents: torch.Tensor | None = None,
    eta: float = 0.0,
    decode: bool = True,
    grad: bool = False,
) -> SampleResult:
    """Generate images for ``prompts`` with classifier-free guidance, calling ``hooks`` each step.

    Example::

        adapter = load_adapter("testbed")
        result = sample(adapter, ["a red circle on a gray background"],
                        generator=torch.Generator().manual_seed(0))
        result.pil()[0].save("out.png")
    """
    t0 = time.perf_counter()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    sched = adapter.with_scheduler(scheduler)
    height = height or adapter.default_resolution
    width = width or adapter.default_resolution
    with torch.set_grad_enabled(grad):
        tokens = adapter.tokenize(prompts)
        cond = adapter.encode_ids(tokens.input_ids)
        if negative_prompt is None:
            uncond = adapter.uncond(len(prompts))
        else:
            neg = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) \
                else list(negative_prompt)
            uncond = adapter.encode(neg)
        sched.set_timesteps(num_inference_steps, device=adapter.device)
        if latents is None:
            latents = initial_latents(adapter, len(prompts), height, width, generator, sched)
        else:
            latents = latents.to(adapter.device, adapter.dtype) * sched.init_noise_sigma
        run = Run(adapter, prompts, tokens, cond, uncond, latents, sched, sched.timesteps,
                  guidance_scale, generator)
        for hook in hooks:
            hook.on_start(run)
        step_kw = _step_kwargs(sched, generator, eta)
        b = len(prompts)
        with AttentionSession(adapter.unet, hooks, run) as attention:
            for i, t in enumerate(run.timesteps):
                x_in = sched.scale_model_input(torch.cat([run.latents] * 2), t)
                step = Step(index=i, t=t, x_t=x_in[b:], guidance_scale=run.guidance_scale,
                            _adapter=adapter)
                attention.begin_step(step)
                out = adapter.eps(x_in, t, torch.cat([run.uncond, run.cond]))
                step.eps_uncond, step.eps_cond = out.chunk(2)
                step.guide()
                for hook in hooks:
                    hook.on_step(run, step)
                run.steps_done = i + 1
                if run.stop:
                    break
                run.latents = sched.step(step.eps, t, run.latents, **step_kw,
                                         return_dict=False)[0]
        for hook in hooks:
            hook.on_end(run)
        stopped = run.steps_done < len(run.timesteps)
        images = adapter.decode(run.latents) if decode and not stopped else None
    return SampleResult(images, run.latents, run.records, run.steps_done, stopped,
                        tokens.truncated, time.perf_counter() - t0)


def seeded_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list:
    """One ``torch.Generator`` per seed, the usual way to make per-prompt noise reproducible."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

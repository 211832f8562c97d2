"""The sampling core: one batched denoising loop that calls hooks and a guidance component.

Classifier-free guidance (Ho & Salimans 2022, eq. 6) is the default :class:`Guidance`:

    eps_hat = eps(x_t, empty) + w * (eps(x_t, c) - eps(x_t, empty))

At each step the loop

1. makes a :class:`Step` and asks the run's guidance which conditioning *branches* to evaluate
   (default: ``"uncond"`` and ``"cond"``);
2. calls every hook's :meth:`Hook.before_step`, which may change ``run.latents`` (x_t), the
   branches (:meth:`Step.add_branch`, :meth:`Step.skip`, a branch's embeddings) or
   ``step.guidance_scale`` (a float or one value per prompt);
3. evaluates all branches in ONE batched UNet call (rows of a branch are laid out one after the
   other: ``[uncond x B, cond x B, extra x B, ...]``, the layout of ``StableDiffusionPipeline``);
4. combines the branch outputs into the guided prediction ``step.eps`` (``guidance.combine``);
5. calls every hook's :meth:`Hook.on_step`, which may read everything, set ``step.eps`` (the
   clean-latent estimate ``step.x0`` follows), change ``step.guidance_scale`` and call
   :meth:`Step.guide`, add a term that needs a gradient w.r.t. x_t (:meth:`Step.x0_grad`), or set
   ``run.stop``;
6. takes the scheduler step with ``step.eps``.

Hooks keep their per-run state in the run (:meth:`Run.state`), never on themselves, so one set of
hook objects serves concurrent runs; the scheduler is copied per run. Cross-attention processors
are wrapped while a run whose hooks want attention is in progress (the UNet's own processor objects
are back when it ends) and find the current run through a context variable
(:mod:`diffmem.core.attention`): UNet calls a hook makes on its own are not observed.

With no hooks the result equals ``StableDiffusionPipeline(...)`` for the same seed, scheduler and
number of steps: same text encoding, initial noise, timesteps, UNet batch layout, scheduler step
arguments and VAE decoding.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from diffmem.core import attention as _attention
from diffmem.core.guidance import Branch, Guidance
from diffmem.core.hooks import Hook
from diffmem.models.adapter import ModelAdapter, Tokenized
from diffmem.runtime.defaults import SAMPLING
from diffmem.runtime.errors import ConfigError


@dataclass
class Run:
    """State of one batched run, shared by all hooks."""

    adapter: ModelAdapter
    prompts: list[str]
    tokens: Tokenized
    cond: torch.Tensor  # (B, L, D) conditional text embeddings
    uncond: torch.Tensor  # (B, L, D) unconditional (negative prompt) embeddings
    latents: torch.Tensor  # (B, C, h, w) current scheduler state; x_T before the first step
    scheduler: Any  # this run's own copy
    timesteps: torch.Tensor
    guidance_scale: float | torch.Tensor
    generator: torch.Generator | list[torch.Generator] | None
    guidance: Guidance = field(default_factory=Guidance)
    records: dict[str, Any] = field(default_factory=dict)
    stop: bool = False
    steps_done: int = 0
    _observers: Any = field(default=None, repr=False)
    _states: dict[int, SimpleNamespace] = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return len(self.prompts)

    def state(self, hook: object) -> SimpleNamespace:
        """The namespace where ``hook`` keeps what it accumulates during this run."""
        key = id(hook)
        if key not in self._states:
            self._states[key] = SimpleNamespace()
        return self._states[key]


@dataclass
class Step:
    """What the loop knows at one denoising step.

    Before the UNet call ``branches`` says what will be evaluated; after it ``out[name]`` holds each
    branch's prediction ``(B, C, h, w)`` (NaN in the rows of prompts a branch skipped) and ``eps``
    the guided prediction given to the scheduler. ``x0`` is the clean-latent estimate of the
    current ``eps``, recomputed whenever ``eps`` changes.
    """

    index: int
    t: torch.Tensor
    run: Run = field(repr=False)
    guidance_scale: float | torch.Tensor = SAMPLING.guidance_scale
    branches: dict[str, Branch] = field(default_factory=dict)
    x_t: torch.Tensor | None = None  # (B, C, h, w) model input (after scale_model_input)
    out: dict[str, torch.Tensor] = field(default_factory=dict)
    layout: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    _eps: torch.Tensor | None = field(default=None, repr=False)
    _x0: torch.Tensor | None = field(default=None, repr=False)

    # ---------------------------------------------------------------- before the UNet call
    def add_branch(self, name: str, emb: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Evaluate ``emb`` ``(B, L, D)`` in the same UNet call (for the prompts where ``mask``)."""
        if self.out:
            raise ConfigError("branches can only be added before the UNet call (before_step)")
        if emb.shape[0] != self.run.batch_size:
            raise ConfigError(f"branch {name!r} has {emb.shape[0]} rows for "
                              f"{self.run.batch_size} prompts")
        self.branches[name] = Branch(emb, None if mask is None else mask.bool().cpu())

    def skip(self, name: str, mask: torch.Tensor | None = None) -> None:
        """Do not evaluate branch ``name`` (for the prompts where ``mask``; default all)."""
        if self.out:
            raise ConfigError("branches can only be skipped before the UNet call (before_step)")
        branch = self.branches.get(name)
        if branch is None:
            return
        keep = torch.ones(self.run.batch_size, dtype=torch.bool) if branch.mask is None \
            else branch.mask.clone()
        keep &= torch.zeros_like(keep) if mask is None else ~mask.bool().cpu()
        if not bool(keep.any()):
            del self.branches[name]
        else:
            branch.mask = keep

    # ---------------------------------------------------------------- after the UNet call
    @property
    def eps(self) -> torch.Tensor | None:
        """The guided prediction; setting it drops the cached ``x0``."""
        return self._eps

    @eps.setter
    def eps(self, value: torch.Tensor) -> None:
        self._eps = value
        self._x0 = None

    @property
    def eps_cond(self) -> torch.Tensor | None:
        return self.out.get("cond")

    @property
    def eps_uncond(self) -> torch.Tensor | None:
        return self.out.get("uncond")

    @property
    def x0(self) -> torch.Tensor:
        """Clean-latent estimate from the *guided* prediction (computed once per ``eps``)."""
        if self._x0 is None:
            self._x0 = self.run.adapter.x0(self.x_t, self.t, self.eps)
        return self._x0

    def evaluated(self, name: str) -> torch.Tensor:
        """(B,) bool: for which prompts branch ``name`` was evaluated at this step."""
        branch = self.branches.get(name)
        if branch is None or name not in self.out:
            return torch.zeros(self.run.batch_size, dtype=torch.bool)
        if branch.mask is None:
            return torch.ones(self.run.batch_size, dtype=torch.bool)
        return branch.mask

    def rows(self, name: str) -> torch.Tensor:
        """Indices of branch ``name``'s rows in the UNet batch (for attention tensors)."""
        return self.layout[name][0]

    def branch(self, tensor: torch.Tensor, name: str = "cond") -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of a UNet-batch tensor (e.g. attention probabilities) that belong to branch
        ``name``, and the prompt index of each row."""
        rows, prompts = self.layout[name]
        return tensor[rows.to(tensor.device)], prompts

    def scale_like(self, ref: torch.Tensor) -> float | torch.Tensor:
        """The guidance scale, as a float or broadcastable per-prompt tensor."""
        w = self.guidance_scale
        if isinstance(w, torch.Tensor):
            return w.reshape(-1, *([1] * (ref.ndim - 1))).to(ref)
        return w

    def guide(self) -> torch.Tensor:
        """Recompute ``eps`` with the run's guidance (after a hook changed the scale)."""
        self.eps = self.run.guidance.combine(self.run, self)
        return self.eps

    def x0_grad(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Gradient w.r.t. x_t of ``fn(x0)`` summed over the batch, with ``eps`` held fixed
        (d x0 / d x_t from the parametrisation; no extra UNet call). ``fn`` gets the clean-latent
        estimate ``(B, C, h, w)`` and returns one value per prompt, e.g. a similarity of the
        decoded image to its nearest training image."""
        with torch.enable_grad():
            x = self.x_t.detach().float().requires_grad_(True)
            x0 = self.run.adapter.x0(x, self.t, self.eps.detach().float())
            (grad,) = torch.autograd.grad(fn(x0).sum(), x)
        return grad.to(self.x_t.dtype)

    def recompute(self, mask: torch.Tensor, embeddings: dict[str, torch.Tensor]) -> None:
        """Re-evaluate branches for the prompts in ``mask`` with new embeddings, in one UNet call,
        and recombine ``eps`` with the run's guidance.

        For methods that decide at a step, from that step's own prediction, to change the
        conditioning of some prompts (e.g. a mitigation gated by the first step's noise
        magnitude): the other prompts keep their outputs untouched. Hooks that *change*
        attention logits apply to this call; observers do not see it. Call it from ``on_step``
        before other hooks change ``eps`` (their changes would be replaced).
        """
        mask = mask.bool().cpu()
        if not bool(mask.any()):
            return
        run = self.run
        saved, self.layout = self.layout, {}
        xs, embs, offset = [], [], 0
        for name, emb in embeddings.items():
            if name not in self.out:
                raise ConfigError(f"branch {name!r} was not evaluated at step {self.index}")
            idx = (mask & self.evaluated(name)).nonzero().flatten()
            xs.append(self.x_t[idx.to(self.x_t.device)])
            embs.append(emb[idx.to(emb.device)])
            self.layout[name] = (torch.arange(offset, offset + len(idx)), idx)
            offset += len(idx)
        try:
            with run._observers.observe(run, self, modifiers_only=True):
                out = run.adapter.eps(torch.cat(xs), self.t, torch.cat(embs))
        finally:
            new_layout, self.layout = self.layout, saved
        for name, (rows, idx) in new_layout.items():
            full = self.out[name].clone()
            full[idx.to(full.device)] = out[rows.to(out.device)]
            self.out[name] = full
        self.guide()


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


def _evaluate(run: Run, step: Step, x_in: torch.Tensor) -> None:
    """One batched UNet call over the step's branches; fills ``step.out`` and ``step.layout``."""
    b = run.batch_size
    xs, embs, offset = [], [], 0
    for name, branch in step.branches.items():
        idx = branch.prompt_index(b, x_in.device)
        if branch.mask is None:
            xs.append(x_in)
            embs.append(branch.emb)
        else:
            xs.append(x_in[idx])
            embs.append(branch.emb[idx])
        step.layout[name] = (torch.arange(offset, offset + len(idx)), idx.cpu())
        offset += len(idx)
    if not xs:
        raise ConfigError(f"step {step.index} evaluates no branch")
    with run._observers.observe(run, step):
        out = run.adapter.eps(torch.cat(xs), step.t, torch.cat(embs))
    for name, branch in step.branches.items():
        rows, idx = step.layout[name]
        part = out[rows[0]: rows[-1] + 1] if len(rows) else out[:0]
        if branch.mask is None:
            step.out[name] = part
        else:
            full = torch.full_like(x_in, float("nan"))
            full[idx.to(full.device)] = part
            step.out[name] = full


def sample(
    adapter: ModelAdapter,
    prompts: Sequence[str],
    *,
    num_inference_steps: int = SAMPLING.steps,
    guidance_scale: float | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    hooks: Sequence[Hook] = (),
    guidance: Guidance | None = None,
    scheduler: str | Any | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    latents: torch.Tensor | None = None,
    eta: float = SAMPLING.eta,
    decode: bool = True,
    grad: bool = False,
    stop_when_done: bool = False,
) -> SampleResult:
    """Generate images for ``prompts`` with ``guidance`` (default CFG), calling ``hooks`` each step.

    ``guidance_scale``: default the adapter's (7.5 for text models; 1 for a pixel-space DDPM,
    whose class guidance is off at 1). ``scheduler`` (a name, class name or instance; default the
    adapter's) is copied for this run.
    ``stop_when_done`` ends the run once every hook has seen its :meth:`Hook.last_step`
    (standalone detection). Thread-safe: several threads may sample with one adapter and one set
    of hooks at once.

    Example::

        adapter = load_adapter("testbed")
        result = sample(adapter, ["a red circle on a gray background"],
                        generator=torch.Generator().manual_seed(0))
        result.pil()[0].save("out.png")
    """
    t0 = time.perf_counter()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if guidance_scale is None:
        guidance_scale = adapter.default_guidance_scale
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
                  guidance_scale, generator, guidance or Guidance())
        for hook in hooks:
            hook.on_start(run)
        step_kw = _step_kwargs(sched, generator, eta)
        # the UNet holds attention wrappers only during the run (its own processors after it)
        with _attention.Observers(adapter.unet, hooks, run) as run._observers:
            ends = [h.last_step(run) for h in hooks] if stop_when_done and hooks else [None]
            last = None if any(e is None for e in ends) else max(ends)
            for i, t in enumerate(run.timesteps):
                step = Step(index=i, t=t, run=run, guidance_scale=run.guidance_scale)
                step.branches = run.guidance.branches(run, step)
                for hook in hooks:
                    hook.before_step(run, step)
                x_in = sched.scale_model_input(run.latents, t)
                step.x_t = x_in
                _evaluate(run, step, x_in)
                step.eps = run.guidance.combine(run, step)
                for hook in hooks:
                    hook.on_step(run, step)
                run.steps_done = i + 1
                if last is not None and i >= last:
                    run.stop = True
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

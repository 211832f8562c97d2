"""Pixel-space DDPM models: a diffusers ``DDPMPipeline`` folder (``unet``: a ``UNet2DModel``,
``scheduler``), unconditional or class-conditional through the UNet's class embedding
(``num_class_embeds`` / ``class_embed_type``), on the same sampling core and hooks as the text
models.

What stands where a text model has text:

- a *prompt* is a class label: ``"class:3"`` or ``"3"`` (or ``"class:circle"`` when the model's
  profile names its classes); ``""`` is the null class. An unconditional model ignores prompts
  (they only count the images).
- the *conditioning* of a branch is a ``(B,)`` long tensor of class labels (``-1`` for an
  unconditional model); :meth:`DDPMAdapter.eps` passes it as ``class_labels``.
- the *null class* of classifier-free guidance over the class (Ho & Salimans 2022) is the last
  class embedding, ``num_class_embeds - 1`` (the convention of diffmem's class-conditional
  testbed, trained with that class dropped in); ``eps_hat = eps(x, null) + w (eps(x, y) -
  eps(x, null))``. At ``w = 1`` (the default: what ``unet(x, t, class_labels=y)`` gives) only
  ``eps(x, y)`` is evaluated.
- the *image* is x0 itself: there is no VAE (``decode`` clamps to ``[-1, 1]``).

With no hooks, :func:`diffmem.core.sampling.sample` computes what ``DDPMPipeline.__call__`` does
for the same generator(s) and number of steps (same noise draw, timesteps, UNet calls and scheduler
step with the generator); a class-conditional model adds ``class_labels=y`` to each UNet call.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from diffmem.models.adapter import ModelAdapter, Tokenized, _module_device
from diffmem.runtime.errors import ConfigError, PromptError

#: prompt prefix of a class label
CLASS_PREFIX = "class:"


class DDPMAdapter(ModelAdapter):
    """A ``DDPMPipeline`` (``UNet2DModel`` + scheduler) in pixel space; see the module."""

    family: ClassVar[str] = "ddpm"
    text_conditioned: ClassVar[bool] = False
    #: plain class-conditional sampling (``unet(x, t, class_labels=y)``); > 1: class guidance
    default_guidance_scale: ClassVar[float] = 1.0

    def __init__(self, pipe, *, path=None, scheduler=None) -> None:
        from pathlib import Path

        self.pipe = pipe
        self.unet = pipe.unet
        self.tokenizer = self.text_encoder = self.vae = None
        self.scheduler = scheduler if scheduler is not None else pipe.scheduler
        self.path = Path(path) if path is not None else None
        self._uncond_cache = {}
        self._profile = None

    # ---------------------------------------------------------------- facts
    @property
    def num_class_embeds(self) -> int | None:
        n = self.unet.config.get("num_class_embeds")
        return int(n) if n else None

    @property
    def class_conditional(self) -> bool:
        return self.num_class_embeds is not None

    @property
    def null_class(self) -> int | None:
        """The class of classifier-free guidance's unconditional branch (the last one)."""
        return self.num_class_embeds - 1 if self.class_conditional else None

    @property
    def guidance_floor(self) -> float | None:
        """AMG's G_spe lowers the class guidance scale down to 0 (the null class alone); an
        unconditional model has no guidance to lower (None)."""
        return 0.0 if self.class_conditional else None

    def uses_uncond(self, scale) -> bool:
        """Whether a step at guidance ``scale`` evaluates the null-class branch (never for an
        unconditional model; for a class-conditional one where some scale is not 1)."""
        if not self.class_conditional:
            return False
        if isinstance(scale, torch.Tensor):
            return bool((scale != 1).any())
        return float(scale) != 1.0

    @property
    def vae_scale_factor(self) -> int:
        return 1

    @property
    def default_resolution(self) -> int:
        size = self.unet.config.sample_size
        return int(size if isinstance(size, int) else size[0])

    @property
    def max_length(self) -> int:
        return 1

    def class_names(self) -> list[str]:
        return list(self.profile.data.get("classes", ())) if self.path is not None else []

    def lacks(self) -> str:
        """What a text-only method needs and this model has not, in words."""
        kind = "a class-conditional" if self.class_conditional else "an unconditional"
        return (f"{kind} pixel-space DDPM (UNet2DModel), with no text encoder, tokenizer or "
                "cross-attention")

    def cross_attention_layers(self) -> list[str]:
        return []

    # ---------------------------------------------------------------- class labels
    def label_of(self, prompt: str) -> int:
        """The class label a prompt names (see module); -1 for an unconditional model."""
        if not isinstance(prompt, str):
            raise PromptError(f"prompts must be strings, got {type(prompt).__name__}")
        if not self.class_conditional:
            return -1
        text = prompt.strip()
        if text == "":
            return self.null_class
        name = text[len(CLASS_PREFIX):].strip() if text.startswith(CLASS_PREFIX) else text
        names = self.class_names()
        if name in names:
            return names.index(name)
        try:
            label = int(name)
        except ValueError:
            known = f" or one of {names}" if names else ""
            raise PromptError(f"{prompt!r} is no class label of this class-conditional DDPM: give "
                              f"'class:N' with N in 0..{self.null_class - 1}{known}") from None
        if not 0 <= label < self.num_class_embeds:
            raise PromptError(f"class {label} is out of range: this model has classes "
                              f"0..{self.null_class - 1} (and the null class {self.null_class})")
        return label

    def tokenize(self, prompts: list[str]) -> Tokenized:
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise PromptError("no prompts given")
        ids = torch.tensor([[self.label_of(p)] for p in prompts], dtype=torch.long)
        return Tokenized(ids, torch.ones(len(prompts), dtype=torch.long), [False] * len(prompts))

    def encode_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Class labels ``(B,)`` (the conditioning of a branch)."""
        return input_ids.reshape(input_ids.shape[0], -1)[:, 0].to(self.device)

    def uncond(self, batch: int) -> torch.Tensor:
        label = self.null_class if self.class_conditional else -1
        return torch.full((batch,), label, dtype=torch.long, device=self.device)

    def split_pooled(self, emb):
        raise ConfigError(self.lacks())

    def token_strings(self, input_ids):
        raise ConfigError(self.lacks())

    # ---------------------------------------------------------------- diffusion
    def eps(self, x_t, t, emb, cross_attention_kwargs=None) -> torch.Tensor:
        """UNet output for ``x_t`` at ``t``; ``emb``: class labels (ignored when unconditional)."""
        if cross_attention_kwargs:
            raise ConfigError(self.lacks())
        if not self.class_conditional:
            return self.unet(x_t, t).sample
        return self.unet(x_t, t, class_labels=emb.to(_module_device(self.unet))).sample

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """x0 is the image: clamped to ``[-1, 1]`` (as ``DDPMPipeline``'s output)."""
        return latents.clamp(-1, 1)

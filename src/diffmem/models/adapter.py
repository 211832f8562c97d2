"""Model adapters: one per model family, exposing what the methods need (pixel-space DDPMs:
:mod:`diffmem.models.ddpm`).

An adapter wraps a stock diffusers ``StableDiffusionPipeline`` (SD 1.x / 2.x) or
``StableDiffusionXLPipeline`` (SDXL, :mod:`diffmem.models.sdxl`) and knows the tokenizer facts that
differ between families (SD 1.x pads with EOS, SD 2.x with "!" = id 0), so that detectors,
explainers and mitigations stay model-agnostic.

Notation (Ho et al. 2020; Song et al. 2021, DDIM):
    x_t      noisy latent at timestep t, as fed to the UNet (after ``scale_model_input``)
    abar_t   cumulative product of (1 - beta), ``scheduler.alphas_cumprod[t]``
    eps      the UNet's output in the scheduler's parametrisation ("epsilon", "v_prediction" or
             "sample"); :meth:`ModelAdapter.x0` converts it to the clean-latent estimate
    x0       (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)            (DDIM eq. 9, epsilon case)
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

# loading a folder and schedulers by name live in their own modules; their names stay
# importable from here
from diffmem.models.loading import SUPPORTED_PIPELINES, _unsupported, load_pipeline
from diffmem.models.loading import _check_folder as _check_folder
from diffmem.models.loading import _quiet_loading as _quiet_loading
from diffmem.models.loading import pipeline_family as pipeline_family
from diffmem.models.profile import ModelProfile, named_model, read_profile
from diffmem.models.schedulers import SCHEDULERS as SCHEDULERS
from diffmem.models.schedulers import _resolve_scheduler
from diffmem.runtime.defaults import SAMPLING
from diffmem.runtime.errors import ConfigError, PromptError
from diffmem.runtime.registry import Registry


class TruncationWarning(UserWarning):
    """A prompt was longer than the text encoder's context and was truncated."""


@contextlib.contextmanager
def quiet_truncation():
    """Ignore :class:`TruncationWarning` inside the block: for code that reports truncation
    itself (per prompt, or once for a whole run instead of once per batch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        yield


@dataclass(frozen=True)
class Tokenized:
    """Token ids of a batch of prompts plus the facts methods need about them."""

    input_ids: torch.Tensor  # (B, max_length)
    lengths: torch.Tensor  # (B,) tokens up to and including the first EOS (BOS + prompt + EOS)
    truncated: list[bool]  # True where the prompt did not fit and was cut

    @property
    def prompt_mask(self) -> torch.Tensor:
        """(B, max_length) bool: BOS, the prompt's tokens and the first EOS (not the padding)."""
        pos = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return pos[None, :] < self.lengths[:, None]


def _offloaded(module: torch.nn.Module) -> bool:
    """Whether diffusers group offloading or an accelerate hook decides where the module runs."""
    return getattr(module, "_diffusers_hook", None) is not None or hasattr(module, "_hf_hook")


def _module_device(module: torch.nn.Module) -> torch.device:
    """The module's device. diffusers' ``ModelMixin.device`` walks every submodule (about 2 ms per
    call on the testbed UNet, several calls per sampling run); the first parameter says the same
    unless offloading hooks are installed."""
    if _offloaded(module):
        return module.device
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The module's floating dtype (first floating parameter), like ``ModelMixin.dtype``."""
    if _offloaded(module):
        return module.dtype
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _silence_length_warning(tokenizer) -> None:
    """diffmem tokenizes without truncation to report it (one TruncationWarning); transformers'
    own "sequence length is longer than the specified maximum" message would say it twice."""
    seen = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(seen, dict):
        seen["sequence-length-is-longer-than-the-specified-maximum"] = True


class ModelAdapter:
    """Wraps a Stable Diffusion pipeline (SD 1.x / 2.x layout) for diffmem's methods.

    Use :func:`load_adapter` to build the adapter of the right family from a path or a pipeline.
    """

    family: ClassVar[str] = "sd"
    bos_index: ClassVar[int] = 0
    #: conditioned on text (a tokenizer, a text encoder, cross-attention); False for pixel DDPMs
    text_conditioned: ClassVar[bool] = True
    #: guidance scale of a run that names none
    default_guidance_scale: ClassVar[float] = SAMPLING.guidance_scale
    #: lowest guidance scale AMG's G_spe lowers to (Chen et al.: s0 - s1 >= 1)
    guidance_floor: ClassVar[float | None] = 1.0

    def uses_uncond(self, scale) -> bool:
        """Whether a step at guidance ``scale`` evaluates the unconditional branch (always for a
        text model: classifier-free guidance)."""
        return True

    def lacks(self) -> str:
        """What a text-only method needs that this model has not ("" for a text model)."""
        return ""

    def __init__(self, pipe, *, path: str | Path | None = None, scheduler=None) -> None:
        self.pipe = pipe
        self.tokenizer = pipe.tokenizer
        self.text_encoder = pipe.text_encoder
        self.unet = pipe.unet
        self.vae = pipe.vae
        #: the default scheduler of :func:`diffmem.core.sampling.sample` (copied per run; the
        #: pipeline's own scheduler is never changed)
        self.scheduler = scheduler if scheduler is not None else pipe.scheduler
        #: the folder the pipeline was loaded from (None for a pipeline object)
        self.path = Path(path) if path is not None else None
        self._uncond_cache: dict[tuple, torch.Tensor] = {}
        self._profile: ModelProfile | None = None
        _silence_length_warning(self.tokenizer)

    def with_default_scheduler(self, scheduler: str | object) -> ModelAdapter:
        """A new adapter sharing this one's modules, whose runs use ``scheduler`` by default."""
        return type(self)(self.pipe, path=self.path,
                          scheduler=_resolve_scheduler(self.scheduler, scheduler))

    @property
    def profile(self) -> ModelProfile:
        """What diffmem knows about this model as data (:mod:`diffmem.models.profile`): known-clean
        prompts, copy criterion, training-set fingerprint; empty for a model that is no testbed.
        Read once from the folder the model was loaded from."""
        if self._profile is None:
            self._profile = read_profile(self.path)
        return self._profile

    # ---------------------------------------------------------------- facts
    @property
    def device(self) -> torch.device:
        return _module_device(self.unet)

    @property
    def dtype(self) -> torch.dtype:
        return _module_dtype(self.unet)

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def bos_id(self) -> int:
        return int(self.tokenizer.bos_token_id)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.get("prediction_type", "epsilon"))

    def cross_attention_layers(self) -> list[str]:
        """Names of the UNet's cross-attention processors (``...attn2.processor``), in order."""
        return [k for k in self.unet.attn_processors if ".attn2." in k]

    # ---------------------------------------------------------------- text
    def tokenize(self, prompts: list[str]) -> Tokenized:
        """Tokenize with padding to the context length; report, never hide, truncation."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise PromptError("no prompts given")
        for p in prompts:
            if not isinstance(p, str):
                raise PromptError(f"prompts must be strings, got {type(p).__name__}")
        # One tokenizer call without truncation; then cut and pad exactly as the tokenizer does with
        # truncation=True, padding="max_length" (keep BOS, the first L - 2 tokens, then EOS).
        full = self.tokenizer(list(prompts), truncation=False).input_ids
        n = self.max_length
        ids = torch.full((len(full), n), self.pad_id, dtype=torch.long)
        truncated = []
        for row, seq in enumerate(full):
            truncated.append(len(seq) > n)
            if len(seq) > n:
                seq = [*seq[: n - 1], seq[-1]]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        is_eos = ids == self.eos_id
        # first EOS position (+1 = number of tokens incl. BOS and EOS)
        lengths = torch.where(is_eos.any(1), is_eos.float().argmax(1), ids.shape[1] - 1) + 1
        if any(truncated):
            cut = [p[:60] + "..." for p, t in zip(prompts, truncated, strict=True) if t]
            warnings.warn(
                f"{sum(truncated)} prompt(s) exceed {self.max_length} tokens and were truncated: "
                f"{cut[:3]}", TruncationWarning, stacklevel=2)
        return Tokenized(ids, lengths, truncated)

    def encode_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text-encoder hidden states for token ids, as ``StableDiffusionPipeline.encode_prompt``."""
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = (input_ids != self.pad_id).long().to(_module_device(self.text_encoder))
        out = self.text_encoder(input_ids.to(_module_device(self.text_encoder)),
                                attention_mask=mask)[0]
        return out.to(dtype=_module_dtype(self.text_encoder), device=self.device)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Conditional text embeddings ``(B, L, D)`` for prompts."""
        return self.encode_ids(self.tokenize(prompts).input_ids)

    def uncond(self, batch: int) -> torch.Tensor:
        """Embedding of the empty prompt, computed once and repeated ``batch`` times."""
        key = (self.device, self.dtype, id(self.text_encoder))
        if key not in self._uncond_cache:
            with torch.no_grad():
                self._uncond_cache[key] = self.encode([""])
        return self._uncond_cache[key].expand(batch, -1, -1)

    # ---------------------------------------------------------------- conditioning layout
    #: rows of the conditioning ``(B, L + extra_rows, D)`` after its L token rows (SDXL: 1, the
    #: packed pooled embedding). Methods that treat rows as tokens use :meth:`split_pooled`.
    extra_rows: ClassVar[int] = 0

    @property
    def pooled_dim(self) -> int:
        """Size P of the pooled text embedding (0: the family has none)."""
        return 0

    def split_pooled(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Conditioning -> its token rows ``(B, L, D)`` (one per token position, attention keys)
        and the pooled embedding ``(B, P)``, or None for a family without one (here: ``emb``)."""
        return emb, None

    def join_pooled(self, tokens: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse of :meth:`split_pooled` (here: ``tokens`` itself)."""
        if pooled is not None:
            raise ConfigError(f"{self.family}: this model family has no pooled text embedding")
        return tokens

    def token_rows(self, emb: torch.Tensor) -> torch.Tensor:
        """The token rows ``(B, L, D)`` of conditioning ``emb`` (all of it for SD 1.x/2.x)."""
        return self.split_pooled(emb)[0]

    def token_strings(self, input_ids: torch.Tensor) -> list[str]:
        """BPE pieces of one row of token ids (``</w>`` marks a word end)."""
        return self.tokenizer.convert_ids_to_tokens(input_ids.tolist())

    # ---------------------------------------------------------------- diffusion
    def eps(self, x_t: torch.Tensor, t: torch.Tensor | int, emb: torch.Tensor,
            cross_attention_kwargs: dict | None = None) -> torch.Tensor:
        """UNet output for (already scaled) ``x_t`` at timestep ``t`` given text embeddings."""
        return self.unet(x_t, t, encoder_hidden_states=emb,
                         cross_attention_kwargs=cross_attention_kwargs, return_dict=False)[0]

    def abar(self, t: torch.Tensor | int) -> torch.Tensor:
        """abar_t of the training noise schedule (the same for every inference scheduler)."""
        ac = self.scheduler.alphas_cumprod
        t = torch.as_tensor(t, device=ac.device).long()
        return ac[t].to(device=self.device, dtype=torch.float32)

    def x0(self, x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        """Clean-latent estimate from the UNet output (DDIM eq. 9 / v- and x0-parametrisation)."""
        a = self.abar(t).reshape(-1, *([1] * (x_t.ndim - 1)))
        x_t32, e32 = x_t.float(), eps.float()
        kind = self.prediction_type
        if kind == "epsilon":
            out = (x_t32 - (1 - a).sqrt() * e32) / a.sqrt()
        elif kind == "v_prediction":
            out = a.sqrt() * x_t32 - (1 - a).sqrt() * e32
        elif kind == "sample":
            out = e32
        else:
            raise ConfigError(f"unsupported prediction_type {kind!r}")
        return out.to(x_t.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in ``[-1, 1]``, ``(B, 3, H, W)``."""
        scaling = self.vae.config.scaling_factor
        return self.vae.decode(latents.to(_module_dtype(self.vae)) / scaling, return_dict=False)[0]

    @staticmethod
    def to_pil(images: torch.Tensor) -> list:
        """Images in ``[-1, 1]`` -> PIL images (as ``VaeImageProcessor.postprocess``)."""
        from diffmem.runtime.images import to_pil

        return to_pil(images)

    def with_scheduler(self, scheduler: str | object | None = None):
        """A fresh scheduler instance for one run: ``scheduler`` by short name, class name or
        instance, else the adapter's default; always a copy, so runs never share scheduler state."""
        import copy

        return copy.deepcopy(_resolve_scheduler(self.scheduler, scheduler))


class SD1Adapter(ModelAdapter):
    """Stable Diffusion 1.x: CLIP ViT-L/14 text encoder; padding with EOS (id 49407)."""

    family = "sd1"


class SD2Adapter(ModelAdapter):
    """Stable Diffusion 2.x: OpenCLIP ViT-H text encoder; padding with "!" (id 0), often v-prediction."""

    family = "sd2"


def load_adapter(model, *, scheduler: str | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None) -> ModelAdapter:
    """Adapter for a pipeline object, a pipeline folder, or ``"testbed"`` (the shipped model).

    ``scheduler`` becomes the adapter's default scheduler (a pipeline object's own scheduler is left
    as it is). Given an adapter, returns it unchanged, or a new adapter sharing its modules with
    ``scheduler`` as default; ``device``/``dtype`` with an adapter are refused (they would move
    modules other adapters share).
    """
    if isinstance(model, ModelAdapter):
        if device is not None or dtype is not None:
            raise ConfigError("load_adapter: device/dtype cannot be applied to an existing adapter; "
                              "move its pipeline (adapter.pipe.to(...)) instead")
        return model if scheduler is None else model.with_default_scheduler(scheduler)
    path = None
    if isinstance(model, (str, Path)):
        model = named_model(str(model)) or model
        path = Path(model)
        pipe = load_pipeline(model, device=device, dtype=dtype)
    else:
        pipe = model
        if device is not None:
            pipe.to(device)
    name = type(pipe).__name__
    if name not in SUPPORTED_PIPELINES and not hasattr(pipe, "unet"):
        raise _unsupported(name)
    if SUPPORTED_PIPELINES.get(name) == "ddpm" or (
            getattr(pipe, "text_encoder", None) is None and hasattr(pipe, "unet")
            and type(pipe.unet).__name__ == "UNet2DModel"):
        cls = FAMILIES.get("ddpm")
    elif getattr(pipe, "text_encoder_2", None) is not None or name == "StableDiffusionXLPipeline":
        cls = FAMILIES.get("sdxl")
    elif name in SUPPORTED_PIPELINES or hasattr(pipe, "text_encoder"):
        tok = pipe.tokenizer
        cls = SD2Adapter if tok.pad_token_id != tok.eos_token_id else SD1Adapter
    else:
        raise _unsupported(name)
    sched = _resolve_scheduler(pipe.scheduler, scheduler) if scheduler is not None else None
    return cls(pipe, path=path, scheduler=sched)


def require_text(adapter: ModelAdapter, what: str) -> None:
    """One :class:`ConfigError` (one line) when ``what`` (a text-only method) meets a model
    without text conditioning, naming what the model lacks."""
    if not adapter.text_conditioned:
        where = f" {adapter.path}" if adapter.path is not None else ""
        raise ConfigError(f"{what} needs a text-conditioned model; the model{where} is "
                          f"{adapter.lacks()}")


#: Adapter classes by model family: one per family (SD 1.x, SD 2.x, SDXL), each in its own module
#: (a new family adds one module and one entry here; ``"module:class"`` entries are imported on
#: first use, so the SDXL module, which builds on this one, is not imported by it).
FAMILIES: Registry[type[ModelAdapter]] = Registry("model family", {
    "sd1": SD1Adapter,
    "sd2": SD2Adapter,
    "sdxl": "diffmem.models.sdxl:SDXLAdapter",
    "ddpm": "diffmem.models.ddpm:DDPMAdapter",
})

"""Stable Diffusion XL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution
Image Synthesis"): two text encoders, a pooled text embedding and size/crop conditioning.

The UNet of SDXL is conditioned on

    encoder_hidden_states = [h1 ; h2]                (B, 77, D1 + D2), penultimate hidden states of
                                                     CLIP ViT-L (h1) and OpenCLIP bigG (h2)
    added_cond_kwargs     = {text_embeds: pooled,    (B, P) projected pooled output of encoder 2
                             time_ids: (H, W, 0, 0, H, W)}   original size, crop corner, target size

as ``StableDiffusionXLPipeline.encode_prompt`` and ``_get_add_time_ids`` compute them (Sec. 2.2 of
the paper; original_size = target_size = the generated resolution, crop (0, 0)).

diffmem's sampling core passes each branch's conditioning as ONE tensor ``(B, L, D)`` that it
concatenates over branches and indexes by row. :class:`SDXLAdapter` therefore *packs* the
conditioning into ``(B, L + 1, D)``:

    rows 0 .. L-1   the L = 77 token embeddings of both encoders, concatenated on the feature axis
                    (D = D1 + D2 = 2048 for SDXL)
    row  L          the pooled embedding of encoder 2 in its first P features (P = 1280 for SDXL),
                    zeros after them

and :meth:`SDXLAdapter.eps` unpacks it into ``encoder_hidden_states`` and ``added_cond_kwargs``
(time ids from the latent size of ``x_t``). Everything that moves, masks or concatenates
conditioning rows (branches, recompute, guidance) therefore works unchanged. What treats rows as
tokens (attribution, embedding optimisation, embedding noise) goes through the adapter's
``split_pooled`` / ``join_pooled`` / ``token_rows`` (``extra_rows = 1``; ``(emb, None)`` and
``tokens`` for SD 1.x/2.x), so that the pooled row is never taken for a token. Tokenizer facts
(``max_length``, BOS/EOS/pad, ``tokenize``) are those of the first tokenizer; the second
tokenizer's ids are the first's with its own padding (both are CLIP BPE with one vocabulary).

The unconditional embedding follows the pipeline's ``force_zeros_for_empty_prompt`` (SDXL base:
True): all zeros (tokens and pooled) for the empty negative prompt, else the encoded "".
"""

from __future__ import annotations

from typing import ClassVar

import torch

from diffmem.models.adapter import (
    ModelAdapter,
    _module_device,
    _module_dtype,
    _silence_length_warning,
)
from diffmem.runtime.errors import ConfigError


class SDXLAdapter(ModelAdapter):
    """Stable Diffusion XL: conditioning packed as ``(B, 77 + 1, D1 + D2)`` (see module docstring)."""

    family: ClassVar[str] = "sdxl"
    extra_rows: ClassVar[int] = 1

    def __init__(self, pipe, *, path=None, scheduler=None) -> None:
        super().__init__(pipe, path=path, scheduler=scheduler)
        self.tokenizer_2 = pipe.tokenizer_2
        self.text_encoder_2 = pipe.text_encoder_2
        if self.text_encoder_2 is None or self.tokenizer_2 is None:
            raise ConfigError("diffmem's SDXL adapter needs text_encoder_2 and tokenizer_2 "
                              "(refiner-only pipelines are not supported)")
        if (len(self.tokenizer_2) != len(self.tokenizer)
                or self.tokenizer_2.model_max_length != self.tokenizer.model_max_length
                or self.tokenizer_2.eos_token_id != self.tokenizer.eos_token_id):
            raise ConfigError("SDXL: the two tokenizers must share one vocabulary and context "
                              "length (as SDXL's CLIP tokenizers do)")
        _silence_length_warning(self.tokenizer_2)

    # ---------------------------------------------------------------- facts
    @property
    def hidden_dims(self) -> tuple[int, int]:
        """Feature sizes D1, D2 of the two encoders' token embeddings."""
        enc1 = self.text_encoder.config.hidden_size if self.text_encoder is not None else 0
        return int(enc1), int(self.text_encoder_2.config.hidden_size)

    @property
    def pooled_dim(self) -> int:
        """P: size of the pooled (projected) embedding of encoder 2."""
        return int(self.text_encoder_2.config.projection_dim)

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        return bool(getattr(self.pipe.config, "force_zeros_for_empty_prompt", True))

    # ---------------------------------------------------------------- packing
    def pack(self, hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """``(B, L, D)`` token embeddings + ``(B, P)`` pooled -> ``(B, L + 1, D)``."""
        d = hidden.shape[-1]
        if pooled.shape[-1] > d:
            raise ConfigError(f"SDXL: pooled size {pooled.shape[-1]} exceeds the token size {d}")
        row = torch.zeros(hidden.shape[0], 1, d, dtype=hidden.dtype, device=hidden.device)
        row[:, 0, : pooled.shape[-1]] = pooled.to(hidden)
        return torch.cat([hidden, row], dim=1)

    def unpack(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, L + 1, D)`` -> token embeddings ``(B, L, D)`` and pooled ``(B, P)``."""
        return emb[:, :-1], emb[:, -1, : self.pooled_dim]

    def split_pooled(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`unpack` with a shape check: token rows ``(B, L, D)`` (both encoders' features,
        the UNet's attention keys) and the pooled embedding ``(B, P)``."""
        if emb.ndim != 3 or emb.shape[1] != self.max_length + 1:
            raise ConfigError(f"SDXL: packed conditioning has {self.max_length + 1} rows "
                              f"({self.max_length} tokens + the pooled embedding), got shape "
                              f"{tuple(emb.shape)}")
        return self.unpack(emb)

    def join_pooled(self, tokens: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`pack`; SDXL conditioning always carries its pooled embedding."""
        if pooled is None:
            raise ConfigError("SDXL: the conditioning needs its pooled embedding (join_pooled)")
        return self.pack(tokens, pooled)

    def time_ids(self, height: int, width: int, batch: int) -> torch.Tensor:
        """``(batch, 6)``: original size, crop corner (0, 0), target size (as the pipeline)."""
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype,
                           device=self.device)
        return ids.repeat(batch, 1)

    # ---------------------------------------------------------------- text
    def _ids_2(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The second tokenizer's ids: the same tokens, padded with its own pad id after EOS."""
        pad2 = self.tokenizer_2.pad_token_id
        if pad2 == self.pad_id:
            return input_ids
        is_eos = input_ids == self.eos_id
        first = torch.where(is_eos.any(1), is_eos.float().argmax(1), input_ids.shape[1] - 1)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return torch.where(pos[None, :] > first[:, None], torch.full_like(input_ids, pad2),
                           input_ids)

    def encode_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Packed conditioning ``(B, L + 1, D)`` of token ids of the first tokenizer, as
        ``StableDiffusionXLPipeline.encode_prompt`` (penultimate hidden states; pooled from
        encoder 2), in the dtype of text encoder 2."""
        parts = []
        pooled = None
        for enc, ids in ((self.text_encoder, input_ids), (self.text_encoder_2,
                                                          self._ids_2(input_ids))):
            if enc is None:
                continue
            out = enc(ids.to(_module_device(enc)), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            parts.append(out.hidden_states[-2])
        hidden = torch.cat(parts, dim=-1)
        dtype = _module_dtype(self.text_encoder_2)
        return self.pack(hidden.to(dtype=dtype, device=self.device),
                         pooled.to(dtype=dtype, device=self.device))

    def uncond(self, batch: int) -> torch.Tensor:
        """Embedding of the empty negative prompt (zeros under ``force_zeros_for_empty_prompt``),
        computed once and repeated ``batch`` times."""
        key = (self.device, self.dtype, id(self.text_encoder_2), self.force_zeros_for_empty_prompt)
        if key not in self._uncond_cache:
            with torch.no_grad():
                emb = self.encode([""])
                if self.force_zeros_for_empty_prompt:
                    emb = torch.zeros_like(emb)
                self._uncond_cache[key] = emb
        return self._uncond_cache[key].expand(batch, -1, -1)

    # ---------------------------------------------------------------- diffusion
    def eps(self, x_t: torch.Tensor, t: torch.Tensor | int, emb: torch.Tensor,
            cross_attention_kwargs: dict | None = None) -> torch.Tensor:
        """UNet output for packed conditioning ``emb`` ``(N, L + 1, D)``."""
        hidden, pooled = self.unpack(emb)
        f = self.vae_scale_factor
        time_ids = self.time_ids(x_t.shape[-2] * f, x_t.shape[-1] * f, x_t.shape[0])
        added = {"text_embeds": pooled, "time_ids": time_ids.to(hidden.dtype)}
        return self.unet(x_t, t, encoder_hidden_states=hidden,
                         cross_attention_kwargs=cross_attention_kwargs,
                         added_cond_kwargs=added, return_dict=False)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in ``[-1, 1]`` (with the VAE's latents mean/std when it has them)."""
        cfg = self.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            c = latents.shape[1]
            m = torch.tensor(mean).view(1, c, 1, 1).to(latents)
            s = torch.tensor(std).view(1, c, 1, 1).to(latents)
            latents = latents * s / cfg.scaling_factor + m
            return self.vae.decode(latents.to(_module_dtype(self.vae)), return_dict=False)[0]
        return super().decode(latents)

"""Cross-attention access through diffusers attention processors.

:class:`ObservableCrossAttention` is a drop-in processor for the UNet's cross-attention layers
(``...attn2.processor``). When a hook asks for a layer at a step, it computes attention explicitly,

    S = Q K^T / sqrt(d)             (logits, shape (batch, heads, queries, tokens))
    A = softmax(S + mask)           (probabilities, in float32)

lets hooks change ``S`` (``attention_logits``) and observe ``A`` (``on_attention``); otherwise it
defers to the layer's original (fast, fused) processor. Heads and dimensions come from the layer
(``attn.heads``), never from constants. :class:`AttentionSession` installs processors only on the
layers some hook asked for and restores the originals when the run ends.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffmem.core.sampling import Hook, Run, Step


def select_layers(available: Sequence[str], patterns: Sequence[str] | str | None) -> list[str]:
    """Layer names matching any pattern (fnmatch or substring); ``None``/``"all"`` = every layer."""
    if patterns is None or patterns == "all":
        return list(available)
    if isinstance(patterns, str):
        patterns = [patterns]
    out = [n for n in available if any(fnmatch.fnmatch(n, p) or p in n for p in patterns)]
    if not out:
        raise ValueError(f"no cross-attention layer matches {list(patterns)}; "
                         f"available: {list(available)}")
    return out


class ObservableCrossAttention:
    """Cross-attention processor that exposes logits and probabilities to the session's hooks."""

    def __init__(self, name: str, fallback, session: AttentionSession) -> None:
        self.name = name
        self.fallback = fallback
        self.session = session

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        hooks = self.session.active_hooks(self.name)
        if not hooks or encoder_hidden_states is None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                 *args, **kwargs)
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, _, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        q = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        k = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        v = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        # 1. logits S = Q K^T * scale, in float32 so that softmax/entropy never see fp16 zeros
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[2], batch)
            scores = scores + mask.view(batch, heads, -1, k.shape[2]).float()
        # 2. hooks may change the logits (e.g. Ren et al.'s rescaling)
        for hook in hooks:
            scores = hook.attention_logits(self.session.run, self.session.step, self.name, scores)
        probs = scores.softmax(-1)
        # 3. hooks observe the probabilities
        for hook in hooks:
            hook.on_attention(self.session.run, self.session.step, self.name, probs)
        out = torch.matmul(probs.to(v.dtype), v)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class AttentionSession:
    """Installs :class:`ObservableCrossAttention` on the layers hooks need, for one run."""

    def __init__(self, unet, hooks: Sequence[Hook], run: Run) -> None:
        self.unet = unet
        self.run = run
        self.step: Step | None = None
        available = [k for k in unet.attn_processors if ".attn2." in k]
        self.wants: dict[str, list[Hook]] = {}
        for hook in hooks:
            layers = getattr(hook, "attention_layers", None)
            if layers is None:
                continue
            for name in select_layers(available, layers):
                self.wants.setdefault(name, []).append(hook)
        self._active: dict[str, list[Hook]] = {}
        self._original: dict | None = None

    def __enter__(self) -> AttentionSession:
        if self.wants:
            self._original = dict(self.unet.attn_processors)
            procs = {
                name: (ObservableCrossAttention(name, proc, self) if name in self.wants else proc)
                for name, proc in self._original.items()
            }
            self.unet.set_attn_processor(procs)
        return self

    def __exit__(self, *exc) -> None:
        if self._original is not None:
            self.unet.set_attn_processor(self._original)
            self._original = None

    def begin_step(self, step: Step) -> None:
        """Choose which hooks see attention at this step (``hook.attention_at(step)``)."""
        self.step = step
        self._active = {
            name: [h for h in hooks if h.attention_at(self.run, step)]
            for name, hooks in self.wants.items()
        }

    def active_hooks(self, name: str) -> list[Hook]:
        return self._active.get(name, [])

"""Cross-attention access through diffusers attention processors.

:class:`ObservableCrossAttention` wraps the UNet's cross-attention processors (``...attn2.processor``)
while a run needs them (:func:`installed`, a context manager that puts the original processor
objects back; :func:`install` / :func:`uninstall` for longer). During a UNet call of
:func:`diffmem.core.sampling.sample` whose hooks asked for a layer at that step and need the
attention matrix (an observer, a hook that changes logits), it computes attention explicitly,

    S = Q K^T / sqrt(d)             (logits, shape (N, heads, queries, tokens), N = UNet batch)
    A = softmax(S + mask)           (probabilities, in float32)

lets hooks change ``S`` (``attention_logits``) and observe ``A`` (``on_attention``); otherwise it
defers to the layer's original (fast, fused) processor, or runs fused attention itself for changes
that act on the keys only (below). The current run and step are found through a
context variable set only around the sampling loop's own UNet call, so UNet calls a hook makes by
itself, other threads' runs and plain pipeline calls go through the original processors. Heads and
dimensions come from the layer (``attn.heads``), never from constants; which rows of the batch
belong to which branch and prompt is in ``step.layout`` (:meth:`Step.branch`, :meth:`Step.rows`).

When every hook on a layer only changes attention and declares the rows it changes
(``Hook.attention_rows``, or the rows of its :class:`~diffmem.core.hooks.KeyEdit`), the layer runs
the original processor for the whole batch and replaces only those rows (when they are not the
whole batch): the other rows stay bit-identical to a run without the hooks (the explicit path
equals the fused one only up to rounding).

Fused changes: a hook whose change can be said on the keys answers ``Hook.attention_keys`` with a
:class:`~diffmem.core.hooks.KeyEdit` (key scales and a key mask per row). When every hook on the
layer does so and none observes (and diffusers passes no attention mask), the changed rows run
``scaled_dot_product_attention`` with their keys scaled (``Q (c K_j)^T = c Q K_j^T``: the logit
is linear in the key) and the key mask as an additive float mask (-inf where hidden, broadcast
over heads and queries): no attention matrix is formed. Otherwise the explicit path applies each
edit to the logits in hook order (``KeyEdit.apply``).
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import threading
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from diffmem.core.hooks import Hook, KeyEdit

if TYPE_CHECKING:
    from diffmem.core.sampling import Run, Step

#: (run, step, {layer: [hooks]}) of the UNet call in progress in this thread/task, or None
_CURRENT: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("diffmem_attention",
                                                                        default=None)
_INSTALL_LOCK = threading.Lock()


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
    """Cross-attention processor that exposes logits and probabilities to the current run's hooks."""

    def __init__(self, name: str, fallback) -> None:
        self.name = name
        self.fallback = fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        current = _CURRENT.get()
        hooks = current[2].get(self.name) if current is not None else None
        if not hooks or encoder_hidden_states is None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                 *args, **kwargs)
        run, step = current[0], current[1]
        n_keys = encoder_hidden_states.shape[1]
        edits = [getattr(h, "attention_keys", _no_edit)(run, step, self.name, n_keys)
                 for h in hooks]
        fused = attention_mask is None and all(
            e is not None and not _observes(h) for h, e in zip(hooks, edits, strict=True))
        rows = _changed_rows(run, step, hooks, edits)
        if fused:
            edit = KeyEdit.combine(edits, n_keys)
            compute = partial(self._fused, attn, hidden_states, encoder_hidden_states, temb, edit)
        else:
            compute = partial(self._explicit, attn, hidden_states, encoder_hidden_states,
                              attention_mask, temb, run, step, hooks, edits)
        batch = hidden_states.shape[0]
        if rows is None or rows.numel() == batch:
            return compute()
        # only some rows change: the others keep the original processor's output bit for bit
        base = self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                             *args, **kwargs)
        if rows.numel() == 0:
            return base
        out = compute()
        idx = rows.to(base.device)
        if fused:  # computed for the edited rows only, in the order of ``rows``
            return base.index_copy(0, idx, out.to(base.dtype))
        return base.index_copy(0, idx, out.index_select(0, idx).to(base.dtype))

    def _fused(self, attn, hidden_states, encoder_hidden_states, temb, edit: KeyEdit):
        """Fused attention for the rows of ``edit`` (in that order), its key scales applied to the
        keys and its key mask as an additive mask (-inf where hidden)."""
        if len(edit.rows) != hidden_states.shape[0]:  # else the rows are the whole batch in order
            r = edit.rows.to(hidden_states.device)
            hidden_states = hidden_states.index_select(0, r)
            encoder_hidden_states = encoder_hidden_states.index_select(0, r.to(
                encoder_hidden_states.device))
        q, k, v, shape = _project(attn, hidden_states, encoder_hidden_states, temb)
        if edit.scale is not None:
            k = k * edit.scale.to(k)[:, None, :, None]  # Q (c K_j)^T = c Q K_j^T
        mask = None
        if edit.mask is not None:
            hidden = edit.mask.to(q.device)[:, None, None, :]  # over heads and queries
            mask = torch.zeros(hidden.shape, dtype=q.dtype, device=q.device).masked_fill(
                hidden, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0,
                                             scale=attn.scale)
        return _finish(attn, out.to(q.dtype), shape)

    def _explicit(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, run,
                  step, hooks, edits):
        q, k, v, shape = _project(attn, hidden_states, encoder_hidden_states, temb)
        batch, heads = q.shape[0], q.shape[1]
        # 1. logits S = Q K^T * scale, in float32 so that softmax/entropy never see fp16 zeros
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[2], batch)
            scores = scores + mask.view(batch, heads, -1, k.shape[2]).float()
        # 2. hooks may change the logits (e.g. Ren et al.'s rescaling), in their order
        for hook, edit in zip(hooks, edits, strict=True):
            scores = edit.apply(scores) if edit is not None else \
                hook.attention_logits(run, step, self.name, scores)
        probs = scores.softmax(-1)
        # 3. hooks observe the probabilities
        for hook in hooks:
            hook.on_attention(run, step, self.name, probs)
        out = torch.matmul(probs.to(v.dtype), v)
        return _finish(attn, out, shape)


def _no_edit(run, step, layer, n_keys) -> None:
    return None  # a hook without ``attention_keys`` (duck-typed) changes logits, if anything


def _observes(hook) -> bool:
    return type(hook).on_attention is not Hook.on_attention


def _project(attn, hidden_states, encoder_hidden_states, temb):
    """Queries, keys, values ``(N, heads, tokens, head_dim)`` of a cross-attention layer (as
    diffusers' ``AttnProcessor2_0``) and what :func:`_finish` needs to shape the output back."""
    residual = hidden_states
    if getattr(attn, "spatial_norm", None) is not None and temb is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_shape = hidden_states.shape
    if hidden_states.ndim == 4:
        b, c, h, w = input_shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    batch = hidden_states.shape[0]
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
    if getattr(attn, "norm_q", None) is not None:
        q = attn.norm_q(q)
    if getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    return q, k, v, (input_shape, residual)


def _finish(attn, out, shape):
    """Attention output ``(N, heads, queries, head_dim)`` -> the layer's output."""
    input_shape, residual = shape
    batch, heads, _, head_dim = out.shape
    out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim)
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if len(input_shape) == 4:
        out = out.transpose(-1, -2).reshape(input_shape)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def _changed_rows(run, step, hooks, edits) -> torch.Tensor | None:
    """Union of the UNet-batch rows the hooks change, when every hook only changes attention and
    says which rows (a :class:`~diffmem.core.hooks.KeyEdit`'s rows, else
    :meth:`~diffmem.core.hooks.Hook.attention_rows`); else None."""
    declared = []
    for hook, edit in zip(hooks, edits, strict=True):
        if _observes(hook):
            return None  # an observer needs every row's probabilities
        if edit is not None:
            rows = edit.rows
        else:
            rows = hook.attention_rows(run, step) if hasattr(hook, "attention_rows") else None
        if rows is None:
            return None
        declared.append(torch.as_tensor(rows, dtype=torch.long).flatten().cpu())
    return torch.unique(torch.cat(declared)) if declared else None


def _modifies(hook) -> bool:
    """Whether ``hook`` changes attention (logits or keys), not only observes it."""
    return (type(hook).attention_logits is not Hook.attention_logits
            or getattr(type(hook), "attention_keys", Hook.attention_keys)
            is not Hook.attention_keys)


def _wrap(unet) -> list[ObservableCrossAttention]:
    """Wrap the cross-attention processors not wrapped yet; the new wrappers (lock held)."""
    procs = unet.attn_processors
    new = {name: ObservableCrossAttention(name, proc) for name, proc in procs.items()
           if ".attn2." in name and not isinstance(proc, ObservableCrossAttention)}
    if new:
        unet.set_attn_processor({name: new.get(name, proc) for name, proc in procs.items()})
    return list(new.values())


def _unwrap(unet, wrappers=None) -> None:
    """Put back the original processor of each wrapper in ``wrappers`` (None: every wrapper)
    still set on ``unet`` (lock held)."""
    procs = unet.attn_processors
    ours = None if wrappers is None else {id(w) for w in wrappers}
    restore = {name: proc.fallback for name, proc in procs.items()
               if isinstance(proc, ObservableCrossAttention) and (ours is None or id(proc) in ours)}
    if restore:
        unet.set_attn_processor({name: restore.get(name, proc) for name, proc in procs.items()})


def install(unet) -> None:
    """Wrap every cross-attention processor of ``unet`` in :class:`ObservableCrossAttention`, once,
    until :func:`uninstall` (:func:`installed` wraps them for a ``with`` block only).

    Outside a sampling run the wrappers call the original processors, so the UNet computes what
    it computed before. Processors set later (``unet.set_attn_processor``) are wrapped again on
    the next run that needs attention.
    """
    with _INSTALL_LOCK:
        _wrap(unet)


def uninstall(unet) -> None:
    """Put the original processors back (undoes :func:`install`): every wrapper on ``unet`` is
    replaced by the very processor object it wrapped."""
    with _INSTALL_LOCK:
        _unwrap(unet)


#: id(unet) -> [unet, number of open ``installed`` blocks, wrappers they made]
_HELD: dict[int, list] = {}


@contextlib.contextmanager
def installed(unet):
    """Wrap ``unet``'s cross-attention processors for the ``with`` block, then put the original
    processor objects back.

    Blocks may overlap (several threads sampling with one UNet): the processors stay wrapped until
    the last open block ends, and only the wrappers these blocks made are removed (a permanent
    :func:`install` stays). The sampling loop (:func:`diffmem.core.sampling.sample`) wraps the UNet
    this way for the runs whose hooks want attention, so after a run the UNet holds its own
    processors again. Outputs do not depend on it: outside a run the wrappers call the originals.
    """
    key = id(unet)
    with _INSTALL_LOCK:
        held = _HELD.setdefault(key, [unet, 0, []])
        held[1] += 1
        held[2].extend(_wrap(unet))
    try:
        yield unet
    finally:
        with _INSTALL_LOCK:
            held[1] -= 1
            if held[1] == 0:
                del _HELD[key]
                _unwrap(unet, held[2])


class Observers:
    """Which hooks observe or change which cross-attention layers during one run.

    A context manager: inside the ``with`` block the UNet's cross-attention processors are wrapped
    (:func:`installed`) when some hook wants attention; at its end the UNet's own processors are
    back.
    """

    def __init__(self, unet, hooks: Sequence[Hook], run: Run) -> None:
        # (a pixel-space UNet2DModel has no cross-attention and no attn_processors)
        procs = getattr(unet, "attn_processors", {}) if hooks else {}
        available = [k for k in procs if ".attn2." in k]
        self.unet = unet
        self.wants: dict[str, list[Hook]] = {}
        for hook in hooks:
            layers = hook.layers(run)
            if layers is None:
                continue
            for name in select_layers(available, layers):
                self.wants.setdefault(name, []).append(hook)
        self._exit = contextlib.ExitStack()

    def __enter__(self) -> Observers:
        if self.wants:
            self._exit.enter_context(installed(self.unet))
        return self

    def __exit__(self, *exc) -> None:
        self._exit.close()

    @contextlib.contextmanager
    def observe(self, run: Run, step: Step, *, modifiers_only: bool = False):
        """Make ``run``/``step`` current for the hooks that want attention at this step
        (``modifiers_only``: only hooks that change logits, for a recomputed UNet call)."""
        active: dict[str, list[Hook]] = {}
        for name, hooks in self.wants.items():
            chosen = [h for h in hooks if h.attention_at(run, step) and not (
                modifiers_only and not _modifies(h))]
            if chosen:
                active[name] = chosen
        token = _CURRENT.set((run, step, active) if active else None)
        try:
            yield
        finally:
            _CURRENT.reset(token)

"""Anti-memorization guidance (Chen, Liu & Xu, CVPR 2024, "Towards Memorization-Free Diffusion
Models", Sec. 3-4, eq. 5-9; reference code ``chenchen-usyd/AMG-sd``, ``ddim.py`` ``p_sample_ddim``
and ``scripts/txt2img.py`` ``cond_fn``).

At every step the guided clean-latent estimate is decoded and matched to its nearest training
image ``n_0`` in a local :class:`~diffmem.similarity.index.TrainingIndex` (decode and search are
:func:`diffmem.detect.replication.decode_and_search`, shared with the per-step detector). When the
similarity ``sigma_t`` passes the threshold ``lambda_t``, three terms change the prediction
(eq. 5: ``eps <- eps + 1{sigma_t > lambda_t} (G_spe + G_dup + G_sim)``):

    G_spe = -s1 (eps(x,y) - eps(x)),        s1 = clip(13 sigma_t, 0, s0 - 1)
    G_dup = -s2 (eps(x,y_N) - eps(x)),      s2 = clip((s0 - 1 - s1) / 0.3 * sigma_t, 0, s0 - 1 - s1)
    G_sim = c3 sqrt(1 - abar_t) grad_{x_t} sigma_t,
            c3 = 100 (sigma'_t - 0.3) exp((T - t) / 170),   only while sigma'_t > lambda_t

- ``G_spe`` lowers the guidance scale (s0 = 7.5 -> down to 1) in proportion to the similarity,
  per prompt (``step.guidance_scale`` as a (B,) tensor, then ``step.guide()``).
- ``G_dup`` adds the caption ``y_N`` of the nearest training image ``n_0`` as a negative branch
  when that caption is duplicated: of ``n_0``'s captions, the one occurring most often among the
  ``k`` nearest items, if it occurs more than ``dup_min * k / dup_k`` times (the reference: more
  than 20 of the 1000 nearest LAION neighbours; here ``k = min(dup_k, len(index))``, so the 2 %
  share is kept on indexes under 1000 items, and more than one occurrence is always required).
  Occurrences count training copies (:meth:`TrainingIndex.caption_occurrences`), so a
  de-duplicated index that records copies (the testbed's: a memorized image stands for 164 generic
  ones) behaves like the reference's non-de-duplicated LAION results, where the duplicates of
  ``n_0`` fill the neighbourhood. The paper defines y_N as n_0's caption; the code takes the most
  common caption among the 1000 neighbours, whoever's it is. On the testbed (4020 items) the 1000
  nearest span a quarter of the index and always include the verbatim images (164 copies each),
  so the code's rule hands template prompts another memorized image's caption; the candidates are
  therefore restricted to n_0's captions (the paper's definition). Once found, the caption is kept for the run
  (pixel-space DDPMs, unconditional and class-conditional: :mod:`diffmem.mitigate.amg_pixel`)
  and applied for ``dup_steps`` = 10 steps after each step that passes the threshold (the
  reference's ``g3_count`` latch). The branch is evaluated in the step's one batched UNet call
  (``step.add_branch("amg_dup", ...)`` for those prompts only), so it takes effect from the step
  after the caption was found; the reference instead re-runs the UNet with three branches at the
  same step (one extra call per guided step).
- ``G_sim`` is the gradient of the similarity to ``n_0`` w.r.t. x_t through the clean-latent
  estimate, the VAE decoder and the differentiable similarity (``eps`` held fixed, as the reference
  computes ``pred_x0`` from a no-grad ``e_t``; :meth:`~diffmem.core.sampling.Step.x0_grad`).
  Sign: the reference's ``cond_fn`` returns ``-grad * 100`` and ``p_sample_ddim`` does ``e_t -=
  sqrt(1 - a_t) * grads * (sim - 0.3) * exp(...)``, i.e. ``eps += sqrt(1 - abar) * 100 * grad(sim)
  * ...``. A larger ``eps`` along ``grad sigma`` lowers x0 (and the DDIM update x_{t-1}) along it:
  the step moves *away* from the neighbour (classifier guidance with log p = -sigma). The
  similarity sigma'_t of this term is re-measured on the estimate after G_spe and G_dup (as the
  reference), against the same neighbour ``n_0`` (the reference searches again; the neighbour is
  kept here to save a search). For v-prediction models the eps-space change ``delta`` is applied to
  the model output as ``delta / sqrt(abar_t)`` (same x0 change).

Similarity units. SSCD: the cosine (the paper's). Tiled L2 (the testbed's criterion, a distance,
lower = closer) is mapped affinely onto the SSCD scale so that every constant above keeps its
meaning: ``sigma = 0.7 - (4/3) d`` sends the testbed copy threshold d = 0.15 to 0.5 (SSCD's copy
threshold) and the nearest-other-image distance d = 0.30 to 0.3 (the schedule's floor); the two
anchors are the strict and lenient ends of :data:`diffmem.detect.replication.DEFAULT_SCHEDULES`.
Its gradient is ``-(4/3) grad d``: pushing sigma down pushes the distance up.

Threshold. AMG uses the reference code's exponential schedule ``lambda_t = 0.3 + 0.1
exp(-0.005 t)`` (:class:`~diffmem.detect.replication.ExponentialSchedule`, similarity units, both
criteria): it reaches 0.4 on the last steps, below the copy threshold 0.5, so guidance starts
before the estimate is a copy. The per-step *detector* keeps its parabolic schedule, whose strict
end is the copy threshold itself (0.5 SSCD, 0.15 tiled L2): right for saying "this generation is a
copy", too late for preventing it.

Where paper and code disagree (the code is followed unless said otherwise):

- the code applies G_spe whenever sigma > 0 (ungated); the paper gates all three terms by
  ``sigma > lambda_t``. Here G_spe is gated (paper; also the clean re-implementation
  ``polimi-ispl/anti-memorization-tta``).
- the paper calls the schedule parabolic; the code's is exponential (used here).
- the code skips guidance for its first 21 images (``base_count <= 20``); not copied.
- the code searches LAION-5B through a (now dead) clip-retrieval service with CLIP embeddings and
  re-ranks by SSCD; here one local index search (SSCD or pixel space).

``check_every`` (1, the reference: every step): decode and search on every n-th step (and the
last) only; the steps between reuse the last similarity and neighbour for G_spe and G_dup and skip
G_sim. The decode and search are AMG's cost (on the testbed a step's decode + search cost about as
much as its UNet call; bench/RESULTS.md), so n trades that cost against fresher checks.

``strength`` scales all three terms (s1 = clip(strength 13 sigma, ...), s2 likewise, G_sim times
strength); 0 is plain generation, bit-identical, with no decode at all. ``g_spe``, ``g_dup``,
``g_sim`` switch the terms. With a :class:`~diffmem.mitigate.base.FirstStepGate`, only flagged
prompts are decoded, searched and guided; the others stay bit-identical.

The index must hold this model's training set: a testbed model needs the index of its own testbed
(``diffmem index build testbed --out IDX``, which records a hash of the testbed spec and of the VAE
that rendered it), and the criterion must be the expected one (tiled L2 for testbed models, SSCD
otherwise; pass ``criterion=`` to choose another). Anything else is one :class:`ConfigError`.
"""

from __future__ import annotations

import math
from dataclasses import fields, replace

import torch

from diffmem.core.sampling import Run, Step
from diffmem.detect.replication import (
    decode_and_search,
)
from diffmem.mitigate.amg_config import (
    CRITERIA,
    DUP_BRANCH,
    L2_OFFSET,
    L2_SLOPE,
    AMGConfig,
)
from diffmem.mitigate.amg_pixel import add_null_branch, guidance_room, needs_null_branch
from diffmem.mitigate.base import FirstStepGate, Mitigation
from diffmem.runtime.errors import ConfigError


class AntiMemorizationGuidance(Mitigation):
    """Anti-memorization guidance (Chen et al., CVPR 2024): G_spe, G_dup and G_sim (see module).

    Args:
        strength: scales all three terms; 0 = plain generation.
        gate: optional :class:`FirstStepGate`.
        index: a :class:`~diffmem.similarity.index.TrainingIndex` (or the folder of a saved one)
            of the model's training set.
        adapter: the model, to check the index against at once (else at the run's start).
        config: an :class:`AMGConfig` (default ``AMGConfig()``).
        **overrides: fields of :class:`AMGConfig` that replace ``config``'s, e.g.
            ``AntiMemorizationGuidance(index=idx, g_sim=False, check_every=4)``.
    """

    name = "amg"

    def __init__(self, strength: float = 1.0, *, gate: FirstStepGate | None = None,
                 index=None, adapter=None, config: AMGConfig | None = None,
                 **overrides) -> None:
        super().__init__(strength, gate=gate)
        unknown = sorted(set(overrides) - {f.name for f in fields(AMGConfig)})
        if unknown:
            raise TypeError(f"AntiMemorizationGuidance got unexpected keyword arguments {unknown}")
        cfg = replace(config or AMGConfig(), **overrides)
        self.config = cfg
        self.index = _open_index(index)
        have = getattr(self.index.embedder, "criterion", None)
        if have not in CRITERIA:
            raise ConfigError(f"amg: the index's embedder measures {have!r}; AMG needs an SSCD "
                              f"or a pixel (tiled L2) index")
        if cfg.criterion is not None and have != cfg.criterion:
            raise ConfigError(f"amg: the index measures {have}, but criterion={cfg.criterion!r} "
                              f"was asked for; use an index built with that embedder")
        if cfg.g_sim and not _differentiable(self.index):
            raise ConfigError(f"amg: G_sim needs a differentiable similarity (SSCD or pixel "
                              f"index); the index's embedder {self.index.embedder.name!r} has "
                              f"none: pass g_sim=False")
        if adapter is not None:
            self.check_model(adapter)

    @classmethod
    def from_context(cls, strength: float, gate: FirstStepGate | None, context,
                     **options) -> AntiMemorizationGuidance:
        if context.index is None:
            raise ConfigError("amg needs a training-set index: build one with `diffmem index "
                              "build SOURCE --out IDX` (testbed: `diffmem index build testbed "
                              "--out IDX`) and pass it (--index IDX)")
        return cls(strength, gate=gate, index=context.index, adapter=context.adapter, **options)

    # ------------------------------------------------------------------ checks
    def check_model(self, adapter) -> None:
        """One :class:`ConfigError` unless the index holds ``adapter``'s training set, measured
        with the expected criterion (once per model and index: the check that passed is kept
        beside them, not on this object, which keeps no state of its runs)."""
        from diffmem.similarity.index_compat import check_index_model_once

        check_index_model_once(self.index, adapter, criterion=self.config.criterion, who="amg")

    # ------------------------------------------------------------------ similarity
    def _similarity(self, scores: torch.Tensor) -> torch.Tensor:
        """Search scores -> sigma in SSCD-like units (see module docstring)."""
        if self.index.embedder.criterion == "tiled_l2":
            return L2_OFFSET - L2_SLOPE * scores
        return scores

    def _differentiable_similarity(self, images: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        """sigma of decoded images ``(n, 3, H, W)`` to their neighbours' references, with grad."""
        emb = self.index.embedder
        if self.index.kind == "pixel":
            from diffmem.similarity.pixel import tiled_l2
            from diffmem.similarity.sscd import resize

            d = tiled_l2(resize(images, emb.size), refs.to(images), grid=emb.grid)
            return L2_OFFSET - L2_SLOPE * d
        e = emb.module()(images)
        return torch.nn.functional.cosine_similarity(e, refs.to(e), dim=-1)

    def _duplicated_caption(self, neighbours: list[int]) -> str | None:
        """y_N: the caption of the nearest item ``neighbours[0]`` that occurs most often among
        the ``k`` nearest items (copy-weighted), if that passes ``dup_min * k / dup_k`` (and 1)."""
        k = len(neighbours)
        counts = self.index.caption_occurrences(neighbours)
        own = [c for c in self.index.item_captions[neighbours[0]] if c] if neighbours[0] >= 0 \
            else []
        if not own:
            return None
        caption = max(own, key=lambda c: counts[c])  # first of equals: the item's first caption
        need = max(1.0, self.config.dup_min * k / self.config.dup_k)
        return caption if counts[caption] > need else None

    # ------------------------------------------------------------------ hooks
    def on_start(self, run: Run) -> None:
        self.check_model(run.adapter)
        b = run.batch_size
        st = run.state(self)
        st.dup_caption = [None] * b  # the duplicated caption found for each prompt (kept)
        st.dup_left = torch.zeros(b, dtype=torch.long)  # steps the negative branch still runs
        st.dup_emb = None
        st.encoded = {}
        st.trace = [[] for _ in range(b)]
        st.fired = [0] * b
        st.first = [-1] * b
        st.spe_steps = [0] * b
        st.dup_steps = [0] * b
        st.sim_steps = [0] * b
        st.nearest = [""] * b
        st.last_sim = st.last_nn = None  # the last check's similarity and neighbour (check_every)

    def before_step(self, run: Run, step: Step) -> None:
        if self.strength == 0:
            return
        targets = self.targets(run)
        if targets is None:
            return
        st = run.state(self)
        if needs_null_branch(run.adapter) and (self.config.g_spe or self.config.g_dup):
            add_null_branch(run, step, targets & (torch.tensor(st.first) >= 0))
        if not self.config.g_dup or run.adapter.guidance_floor is None:
            return
        mask = targets & (st.dup_left > 0)
        if bool(mask.any()):
            step.add_branch(DUP_BRANCH, st.dup_emb, mask)

    def on_step(self, run: Run, step: Step) -> None:
        if self.strength == 0:
            return
        targets = self.targets(run)
        if targets is None or not bool(targets.any()):
            return
        st = run.state(self)
        b = run.batch_size
        s = self.strength
        idx = targets.nonzero().flatten()
        k = min(self.config.dup_k, len(self.index)) if self.config.g_dup else 1
        # 1. sigma_t of each targeted prompt to its nearest training image; lambda_t. With
        # check_every = n > 1 the decode and search run on every n-th step (and the last); the
        # steps between reuse the last sigma and neighbour (G_spe, G_dup) and skip G_sim.
        last = len(run.timesteps) - 1
        checked = step.index % self.config.check_every == 0 or step.index == last
        if checked:
            found = decode_and_search(run, step, self.index, rows=targets, k=k)
            sim = torch.zeros(b, dtype=torch.float64)
            sim[idx] = self._similarity(found.scores[:, 0].double())
            nn_rows = torch.full((b,), -1, dtype=torch.long)
            nn_rows[idx] = found.indices[:, 0].long()
            st.last_sim, st.last_nn = sim, nn_rows
        elif st.last_sim is not None:
            sim, nn_rows = st.last_sim, st.last_nn
        else:
            return
        lam = self.config.schedule.at(run.adapter, step.t)
        fired = targets & (sim > lam)
        for j, i in enumerate(idx.tolist()):
            if checked:
                st.trace[i].append(float(sim[i]))
                st.nearest[i] = found.ids[j][0]
            if fired[i]:
                st.fired[i] += 1
                if st.first[i] < 0:
                    st.first[i] = step.index
                if self.config.g_dup and checked and run.adapter.guidance_floor is not None:
                    cap = self._duplicated_caption(found.indices[j].tolist())
                    if cap is not None:
                        st.dup_caption[i] = cap
        # 2. G_spe: per-prompt guidance scale lowered by s1; G_dup: negative caption branch
        base = _per_prompt(step.guidance_scale, b)
        cap = guidance_room(run.adapter, base)
        simf = sim.float()
        s1 = torch.zeros(b)
        if self.config.g_spe:
            s1 = torch.where(fired & (step.evaluated("uncond") | run.adapter.text_conditioned),
                             torch.minimum((s * self.config.spe_scale * simf).clamp_min(0), cap),
                             torch.zeros(b))
        dup_rows = step.evaluated(DUP_BRANCH) & targets
        changed = (s1 > 0) | dup_rows
        if bool(changed.any()):
            old = step.eps
            if bool((s1 > 0).any()):
                step.guidance_scale = base - s1
                step.guide()
            eps = step.eps
            if bool(dup_rows.any()):
                room = cap - s1
                s2 = torch.minimum((s * room / self.config.dup_ref * simf).clamp_min(0), room)
                s2 = torch.where(dup_rows, s2, torch.zeros(b))
                e_u, e_dup = step.out["uncond"], step.out[DUP_BRANCH]
                rows = dup_rows.to(eps.device)[:, None, None, None]
                term = torch.where(rows, e_u - e_dup, torch.zeros_like(eps))
                eps = eps + s2.to(eps)[:, None, None, None] * term
            step.eps = torch.where(changed.to(old.device)[:, None, None, None], eps, old)
        # 3. G_sim on the estimate after G_spe and G_dup, away from the same neighbour
        sim_rows = (fired | changed) & targets if self.config.g_sim and checked \
            else torch.zeros(b, dtype=torch.bool)
        if bool(sim_rows.any()):
            self._apply_g_sim(run, step, sim_rows, nn_rows, lam, st)
        # 4. bookkeeping: counts and the G_dup latch (reference g3_count)
        for i in idx.tolist():
            st.spe_steps[i] += int(s1[i] > 0)
            st.dup_steps[i] += int(dup_rows[i])
        if self.config.g_dup:
            trigger = fired & torch.tensor([c is not None for c in st.dup_caption])
            st.dup_left = torch.where(trigger, torch.full_like(st.dup_left, self.config.dup_steps),
                                      (st.dup_left - dup_rows.long()).clamp_min(0))
            if bool(trigger.any()):
                self._encode_dup(run, st, trigger)

    def _apply_g_sim(self, run: Run, step: Step, rows: torch.Tensor, nn_rows: torch.Tensor,
                     lam: float, st) -> None:
        sel = rows.nonzero().flatten()
        refs = self.index.references(nn_rows[sel].tolist())
        measured: list[torch.Tensor] = []
        dev = step.x_t.device

        def fn(x0: torch.Tensor) -> torch.Tensor:
            images = run.adapter.decode(x0[sel.to(x0.device)]).float()
            sig = self._differentiable_similarity(images, refs)
            measured.append(sig.detach().cpu())
            out = torch.zeros(x0.shape[0], dtype=sig.dtype, device=sig.device)
            return out.index_put((sel.to(sig.device),), sig)

        grad = step.x0_grad(fn).float()
        sim2 = torch.zeros(run.batch_size)
        sim2[sel] = measured[0].float()
        act = rows & (sim2 > lam)
        if not bool(act.any()):
            return
        t = float(step.t)
        total = run.scheduler.config.num_train_timesteps
        abar = run.adapter.abar(step.t).float()
        coef = (self.strength * self.config.sim_scale * (sim2 - self.config.sim_offset)
                * math.exp((total - t) / self.config.sim_decay))
        coef = torch.where(act, coef, torch.zeros_like(coef)).to(dev)
        delta = (1 - abar).sqrt() * coef[:, None, None, None] * grad  # eps-space change
        kind = run.adapter.prediction_type
        if kind == "v_prediction":
            delta = delta / abar.sqrt()
        elif kind == "sample":
            delta = -delta * (1 - abar).sqrt() / abar.sqrt()
        new = step.eps + delta.to(step.eps.dtype)
        step.eps = torch.where(act.to(dev)[:, None, None, None], new, step.eps)
        for i in act.nonzero().flatten().tolist():
            st.sim_steps[i] += 1

    def _encode_dup(self, run: Run, st, rows: torch.Tensor) -> None:
        if st.dup_emb is None:
            st.dup_emb = run.uncond.clone()
        for i in rows.nonzero().flatten().tolist():
            cap = st.dup_caption[i]
            if cap not in st.encoded:
                with torch.no_grad():
                    st.encoded[cap] = run.adapter.encode([cap])[0]
            st.dup_emb[i] = st.encoded[cap].to(st.dup_emb)

    def on_end(self, run: Run) -> None:
        st = run.state(self)
        targets = self.targets(run)
        if targets is not None and self.strength > 0:
            for i in targets.nonzero().flatten().tolist():
                self.report(run, i, similarity=[round(v, 4) for v in st.trace[i]],
                            max_similarity=max(st.trace[i], default=None),
                            nearest=st.nearest[i], fired_steps=st.fired[i],
                            first_fired=st.first[i], spe_steps=st.spe_steps[i],
                            dup_steps=st.dup_steps[i], sim_steps=st.sim_steps[i],
                            dup_caption=st.dup_caption[i])
        super().on_end(run)


def _per_prompt(scale: float | torch.Tensor, batch: int) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        return scale.detach().float().cpu().reshape(-1).expand(batch).clone()
    return torch.full((batch,), float(scale))


def _open_index(index):
    from diffmem.similarity.index import load_index

    return load_index(index, what="amg",
                      missing="amg needs a training-set index (index=...): build one with `diffmem "
                              "index build SOURCE --out IDX` (testbed: `diffmem index build testbed "
                              "--out IDX`)")


def _differentiable(index) -> bool:
    if index.kind == "pixel":
        return True
    return callable(getattr(index.embedder, "module", None))

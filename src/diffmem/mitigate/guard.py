"""The closed-loop guard, what ``--mitigate auto`` means: watch, intervene, verify, escalate, report.

1. **Watch** (:class:`~diffmem.mitigate.watch.Watch`): every image starts as a plain generation;
   the first-step noise magnitude (Wen et al. 2024, eq. 4) and, with the training set's index, a
   decoded x0 estimate searched every ``watch_every`` steps (Chen et al. CVPR 2024, Sec. 3.4) flag
   the prompts that head for a copy. Every prompt's plain run goes on with the batch (the
   unflagged images are then bit-identical to plain generation); a run whose prompts are all
   flagged stops there.
2. **Verify** (with the index): every final image, plain or mitigated, is searched in the index; an
   image passes when it stays ``margin`` beyond the copy threshold of the index's criterion
   (:data:`~diffmem.models.profile.CRITERIA`), so that a reference a little closer than the indexed
   one (the model's own rendering of the training image) does not turn a pass into a copy. With
   the index the final plain image decides: a flagged image that passes is served plain.
3. **Intervene**: an image that fails (without an index: that was flagged; or whose run stopped)
   is generated again from its own x_T with the first method of the ladder (ungated).
4. **Escalate**: an image that still copies is generated again with the next rung of the ladder
   (``"amg"``, then ``"amg+reseed"``: AMG from a new x_T), at most ``max_tries`` mitigated tries;
   then the least similar image is served and marked ``unresolved``.
5. **Report** per image a :class:`Verdict`: ``clean`` (untouched), ``mitigated`` (with what, at
   which step the watch fired, how many tries, its nearest training image and similarity) or
   ``unresolved``. With an index, no copy is served unmarked.

Without an index the model's own images are the reference (:mod:`diffmem.mitigate.self_reference`,
``GuardConfig.agreement``): images of one prompt from different seeds that copy each other by the
model's copy criterion are flagged too (a prompt with one image gets a probe image; a first-step
gate flag stands only when that comparison confirms it, ``GuardConfig.confirm_gate``), and mitigated
images are verified against the flagged plain images and the other served images of their prompt,
climbing the same ladder; their verdicts say ``reference: "own plain images"``, ``verified: False``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from diffmem.core.sampling import sample, seeded_generators
from diffmem.mitigate.guard_config import GuardConfig
from diffmem.models.adapter import ModelAdapter
from diffmem.models.profile import copy_criterion
from diffmem.runtime.defaults import SAMPLING
from diffmem.runtime.errors import ConfigError


@dataclass
class Verdict:
    """What the guard did to one image."""

    status: str  # clean | mitigated | unresolved
    seed: int  # the seed of the served image's x_T
    method: str | None = None
    # what flagged it: gate | replication | verify | agreement | "agreement (prompt)" (another
    # image of its prompt was flagged; no index); on a clean image: an early signal of the watch
    # that the final image's verification overruled
    watch: str | None = None
    fired_at: int | None = None  # step at which the watch fired
    tries: int = 0  # mitigated generations made for this image
    verified: bool = False  # checked against the training index
    reference: str | None = None  # what it was checked against: training index | own plain images
    nearest: str | None = None
    similarity: float | None = None
    criterion: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class GuardResult:
    """Images (``(N, 3, H, W)`` in [-1, 1]) with one :class:`Verdict` each, and timings.

    ``records["verdict"]`` holds the verdicts as dicts and ``truncated`` which prompts the text
    encoder cut, so that a result is written like a :class:`~diffmem.core.sampling.SampleResult`
    (``pil()``, ``truncated``, ``records``)."""

    images: torch.Tensor
    verdicts: list[Verdict]
    seconds: float
    generations: int  # sampling runs' rows, plain ones included
    records: dict = field(default_factory=dict)
    truncated: list[bool] = field(default_factory=list)

    def pil(self) -> list:
        return ModelAdapter.to_pil(self.images)


class Guard:
    """Generate with the closed loop. ``threshold``: the first-step noise-magnitude threshold
    (default: the stored calibration of the model); ``index``: the training set's index."""

    def __init__(self, adapter: ModelAdapter, *, index=None, threshold: float | None = None,
                 config: GuardConfig | None = None, context=None) -> None:
        from diffmem.mitigate.registry import MitigationContext, parse_spec

        self.adapter = adapter
        self.index = index
        self.config = config or GuardConfig()
        if self.config.max_tries < 1 or not self.config.ladder:
            raise ConfigError("the guard needs at least one try and one method")
        if int(self.config.amg_check_every) != self.config.amg_check_every or \
                self.config.amg_check_every < 1:
            raise ConfigError(f"the guard's amg_check_every must be an integer >= 1, got "
                              f"{self.config.amg_check_every}")
        if not self.config.agreement_margin >= 0:
            raise ConfigError(f"the guard's agreement_margin must be >= 0, got "
                              f"{self.config.agreement_margin}")
        if self.config.probe_offset == 0:
            raise ConfigError("the guard's probe needs another seed (probe_offset != 0)")
        for spec in self.config.ladder:
            parse_spec(spec.removesuffix("+reseed"))
        if index is not None:  # an index of another model's images: one clear error, up front
            from diffmem.similarity.index_compat import check_index_model_once

            check_index_model_once(index, adapter, who="the guard (--mitigate auto)")
        self.context = context or MitigationContext(adapter, threshold=threshold, index=index)
        if self.config.amg_check_every != 1:
            amg = {**self.context.options.get("amg", {}),
                   "check_every": self.config.amg_check_every}
            self.context = replace(self.context, options={**self.context.options, "amg": amg})
        if threshold is None and index is None:
            threshold = self.context.require_threshold()
        self.threshold = threshold if threshold is not None else self._optional_threshold()
        if index is not None:
            self.criterion = copy_criterion(index.embedder.criterion)
        else:  # the agreement check and the own-image reference use the model's own criterion
            from diffmem.mitigate.self_reference import criterion_of

            self.criterion = criterion_of(adapter)

    def _optional_threshold(self) -> float | None:
        try:
            return self.context.require_threshold()
        except ConfigError:
            return None  # the index's checks watch alone

    # ------------------------------------------------------------------ verification
    def passes(self, similarity: float) -> bool:
        """Whether an image at ``similarity`` to its nearest training image may be served."""
        c = self.criterion
        return c.margin(similarity) < -self.config.margin

    # ------------------------------------------------------------------ the loop
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], *,
                 num_inference_steps: int = SAMPLING.steps,
                 guidance_scale: float | None = None,
                 cond: torch.Tensor | None = None,
                 latents: torch.Tensor | None = None) -> GuardResult:
        """One image per (prompt, seed) pair, guarded (``guidance_scale`` None: the model's own).

        ``cond`` (``(N, L, D)``, optional): generate from these text embeddings instead of the
        encoded prompts, in every try (the recovery check's optimised embeddings); ``latents``
        (``(N, C, h, w)``, optional): this x_T instead of the seed's, in every try that does not
        reseed (a ``+reseed`` try draws its own x_T, as for any prompt)."""
        from diffmem.mitigate.watch import Watch

        prompts, seeds = list(prompts), [int(s) for s in seeds]
        if len(prompts) != len(seeds):
            raise ConfigError("the guard needs one seed per prompt")
        t0 = time.perf_counter()
        kw = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
        own_reference = self.index is None and self.config.agreement
        watch = Watch(threshold=self.threshold, index=self.index, every=self.config.watch_every,
                      halt=not own_reference)
        timing = {"watch": 0.0, "verify": 0.0, "tries": []}
        given = (cond, latents)
        plain = sample(self.adapter, prompts, generator=seeded_generators(seeds),
                       hooks=[*_inputs(given, list(range(len(prompts))), False), watch], **kw)
        timing["watch"] = time.perf_counter() - t0
        rows = plain.records[watch.name]
        n = len(prompts)
        images = (plain.images.clone() if plain.images is not None
                  else torch.zeros(n, 3, *self._image_size()))
        verdicts = [Verdict("clean", seeds[i]) for i in range(n)]
        todo = [i for i in range(n) if rows[i]["flagged"]]
        for i in todo:
            verdicts[i].watch, verdicts[i].fired_at = rows[i]["reason"], rows[i]["step"]
        if self.index is not None:
            # with the index the final plain image decides: an image the watch flagged whose
            # plain run finished is served plain when it passes verification (the watch's
            # signals are estimates; it saves compute when it halts a run it flagged entirely)
            finished = not plain.stopped_early
            check = [i for i in range(n) if finished or not rows[i]["flagged"]]
            t1 = time.perf_counter()
            self._verify(images, check, verdicts)
            timing["verify"] += time.perf_counter() - t1
            todo = [i for i in todo if not finished]
            for i in check:
                if not self.passes(verdicts[i].similarity):
                    verdicts[i].watch = verdicts[i].watch or "verify"
                    todo.append(i)
        generations = n
        reference, context = self.index, self.context
        # what makes two images "of the same prompt" for the agreement check: the prompt text, or
        # with given embeddings the embedding row itself
        keys = list(prompts) if cond is None else [
            "cond:" + hashlib.sha1(cond[i].detach().float().cpu().numpy().tobytes()).hexdigest()
            for i in range(n)]
        if self.index is None and self.config.agreement:
            t1 = time.perf_counter()
            reference, probes = self._agreement(prompts, keys, seeds, images, rows, verdicts,
                                                todo, kw, given)
            generations += probes
            timing["agreement"] = time.perf_counter() - t1
            if reference is not None:
                context = replace(self.context, index=reference)
        best: dict[int, tuple[float, torch.Tensor, Verdict]] = {}
        tries = self.config.max_tries if reference is not None else 1
        for level in range(tries):
            if not todo:
                break
            spec = self.config.ladder[min(level, len(self.config.ladder) - 1)]
            method, reseed = spec.removesuffix("+reseed"), spec.endswith("+reseed")
            try_seeds = [seeds[i] + (level * self.config.reseed_offset if reseed else 0)
                         for i in todo]
            t1 = time.perf_counter()
            out = self._mitigated([prompts[i] for i in todo], try_seeds, method, kw,
                                  _inputs(given, todo, reseed), context)
            timing["tries"].append({"method": spec, "images": len(todo),
                                    "seconds": time.perf_counter() - t1})
            generations += len(todo)
            for j, i in enumerate(todo):
                images[i] = out[j]
                v = verdicts[i]
                v.status, v.method, v.tries, v.seed = "mitigated", spec, level + 1, try_seeds[j]
            if reference is None:
                todo = []  # nothing to verify against: served as mitigated, unverified
                break
            t1 = time.perf_counter()
            self._verify(images, todo, verdicts, reference)
            if reference is not self.index:
                self._verify_agreement(images, prompts, keys, todo, verdicts, reference)
            timing["verify"] += time.perf_counter() - t1
            still = []
            for i in todo:
                v = verdicts[i]
                score = self.criterion.margin(v.similarity)
                if i not in best or score < best[i][0]:
                    best[i] = (score, images[i].clone(), Verdict(**asdict(v)))
                if not self.passes(v.similarity):
                    still.append(i)
            todo = still
        for i in todo:  # still copying after every try: the least similar image, marked
            _, img, v = best[i]
            images[i] = img
            v.status = "unresolved"
            v.tries = tries
            verdicts[i] = v
        records = {"timing": timing, "verdict": [v.to_json() for v in verdicts]}
        return GuardResult(images, verdicts, time.perf_counter() - t0, generations, records,
                           list(plain.truncated))

    def _verify(self, images: torch.Tensor, which: list[int], verdicts: list[Verdict],
                reference=None) -> None:
        if not which:
            return
        reference = reference if reference is not None else self.index
        found = reference.search(images[which].float().clamp(-1, 1).cpu(), k=1)
        own = reference is not self.index
        for i, ids, s in zip(which, found.ids, found.scores[:, 0].tolist(), strict=True):
            v = verdicts[i]
            v.verified, v.nearest, v.similarity = not own, ids[0], float(s)
            v.reference = "own plain images" if own else "training index"
            v.criterion = self.criterion.name

    def _verify_agreement(self, images, prompts, keys, todo, verdicts, reference) -> None:
        """Without an index, a mitigated image must not copy another served image of its prompt
        either (a mitigation can land on a memorized image the plain run missed); the images
        that do join the reference, so that the next rung is verified against them (and AMG
        guided away from them)."""
        from diffmem.mitigate.self_reference import agreement

        wanted = {keys[i] for i in todo}  # only the images of the prompts being retried
        rows = [i for i in range(len(keys)) if keys[i] in wanted]
        found = agreement(self.adapter, images[rows].float().clamp(-1, 1).cpu(),
                          [keys[i] for i in rows], [verdicts[i].seed for i in rows])
        at = {i: j for j, i in enumerate(rows)}
        failed = []
        for i in todo:
            v, j = verdicts[i], at[i]
            s = found.similarity[j]
            if s is not None and self.criterion.closer(s, v.similarity):
                v.nearest, v.similarity = f"served:{rows[found.nearest[j]]}", s
            if found.copies[j]:
                failed.append(i)
        if failed:
            reference.add(images[failed].float().clamp(-1, 1).cpu(),
                          [prompts[i] for i in failed], [f"tried:{i}" for i in failed])

    def _agreement(self, prompts, keys, seeds, images, rows, verdicts, todo, kw, given):
        """Without an index: flag the images that copy another image of their prompt (a probe
        image from another seed for a prompt with one image), and return the index of the
        flagged plain images (None when nothing is flagged) and the number of probe images.
        Two images flag each other ``agreement_margin`` inside the copy criterion, or within it
        when the first-step gate flagged the image; a gate flag the comparison does not confirm
        is lifted (``confirm_gate``; the image is served plain, its verdict keeps the watch)."""
        from diffmem.mitigate.self_reference import agreement, self_reference_index

        n, cfg = len(prompts), self.config
        count: dict[str, int] = {}
        for key in keys:
            count[key] = count.get(key, 0) + 1
        gated = {i for i in todo if rows[i]["reason"] == "gate"} if cfg.confirm_gate else set()
        singles = [i for i in range(n) if count[keys[i]] == 1 and cfg.probe
                   and (not rows[i]["flagged"] or i in gated)]
        probe = torch.zeros(0, *images.shape[1:])
        if singles:
            res = sample(self.adapter, [prompts[i] for i in singles],
                         generator=seeded_generators([seeds[i] + cfg.probe_offset
                                                      for i in singles]),
                         hooks=_inputs(given, singles, True), **kw)
            probe = res.images.float().clamp(-1, 1).cpu()
        pool = torch.cat([images.float().clamp(-1, 1).cpu(), probe])
        found = agreement(self.adapter, pool, list(keys) + [keys[i] for i in singles],
                          list(seeds) + [seeds[i] + cfg.probe_offset for i in singles])
        inside = [None if s is None else self.criterion.margin(s) for s in found.similarity]
        copies = [m is not None and (m > cfg.agreement_margin or (i in gated and m > 0))
                  for i, m in enumerate(inside[:n])]
        for i in gated:
            if inside[i] is not None and not copies[i]:  # compared, not confirmed: served plain
                todo.remove(i)
        captions = list(prompts) + [prompts[i] for i in singles]
        for i in range(n):
            if copies[i] and i not in todo:
                v = verdicts[i]
                v.watch, v.fired_at = "agreement", None
                todo.append(i)
        if cfg.prompt_wide:  # the prompt's other images (they join the reference: a
            # lone copy stays a copy when the mitigation leaves it near its plain image)
            flagged_keys = {keys[i] for i in range(n) if copies[i]}
            for i in range(n):
                if keys[i] in flagged_keys and i not in todo:
                    verdicts[i].watch, verdicts[i].fired_at = "agreement (prompt)", None
                    todo.append(i)
        flagged = set(todo)
        ref_rows = [r for r in range(len(pool))
                    if (r < n and r in flagged) or (r >= n and singles[r - n] in flagged)]
        if not ref_rows:
            return None, len(singles)
        labels = [f"plain:{r}" if r < n else f"probe:{singles[r - n]}" for r in ref_rows]
        index = self_reference_index(self.adapter, pool[ref_rows], labels,
                                     [captions[r] for r in ref_rows])
        return index, len(probe)

    def _mitigated(self, prompts: list[str], seeds: list[int], method: str, kw: dict,
                   inputs: list = (), context=None) -> torch.Tensor:
        from diffmem.mitigate.registry import build_mitigations

        hooks = [*inputs, *build_mitigations(method, context or self.context)]
        res = sample(self.adapter, prompts, generator=seeded_generators(seeds), hooks=hooks, **kw)
        return res.images

    def _image_size(self) -> tuple[int, int]:
        side = self.adapter.default_resolution
        return side, side


def _inputs(given: tuple, rows: list[int], reseed: bool) -> list:
    """The :class:`~diffmem.core.hooks.SetInputs` hook of ``rows`` (none without given inputs)."""
    cond, latents = given
    if cond is None and latents is None:
        return []
    from diffmem.core.hooks import SetInputs

    return [SetInputs(cond[rows] if cond is not None else None,
                      None if reseed or latents is None else latents[rows])]


def guard_for_spec(mitigate: str, adapter: ModelAdapter, *, index=None,
                   threshold: float | None = None, context=None) -> Guard:
    """The guard of a ``--mitigate`` spec that names ``auto``: alone, the default ladder;
    ``auto,ren:1.5``: those methods as the first rung, then the rest of the default ladder.
    Without an index AMG is guided away from the guard's own flagged plain images
    (:attr:`GuardConfig.agreement`)."""
    from diffmem.mitigate.registry import parse_spec

    parsed = parse_spec(mitigate)
    first = ",".join(n if s is None else f"{n}:{s:g}" for n, s in parsed if n != "auto")
    base = GuardConfig()
    ladder = base.ladder if not first else (first, *base.ladder[1:])
    return Guard(adapter, index=index, threshold=threshold, context=context,
                 config=GuardConfig(ladder=ladder))


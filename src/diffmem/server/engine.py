"""The model work behind the service: scoring, explaining and generating with one loaded adapter.

Every method here is synchronous and runs in a worker thread (never on the event loop). Several
threads may use one :class:`Engine` at once: the sampling core keeps per-run state in
``run.state(hook)`` (hooks and detectors are shared). The tokenizer is wrapped in a lock: with
some transformers / tokenizers versions a fast (Rust) tokenizer called from two threads at once
with different truncation settings raises ``RuntimeError: Already borrowed``
(huggingface/tokenizers#537, huggingface/transformers#47085). (4 threads x 300 batched calls with
transformers 5.24 / tokenizers 0.23 raised no error without the lock; it stays as a guard.)

Cancellation: :meth:`Engine.explain` and :meth:`Engine.generate` take a ``cancel`` event (set by
the service when the request times out, the client disconnects or the server shuts down). The
engine's adapter checks the event of the calling thread before every UNet call and raises
:class:`Cancelled`, so cancelled work stops within one denoising step (explanations included);
a generation's hooks also end the run after the current step.
"""

from __future__ import annotations

import base64
import collections
import copy
import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from diffmem.core.sampling import Hook, Run, Step, sample, seeded_generators
from diffmem.detect import NoiseMagnitude
from diffmem.detect.verdict import ESTIMATE_NOTE, GenerationJudge
from diffmem.models.adapter import ModelAdapter, quiet_truncation
from diffmem.runtime.defaults import SAMPLING
from diffmem.runtime.errors import ConfigError


class _LockedTokenizer:
    """Delegates to a tokenizer; every method call holds one lock."""

    def __init__(self, tokenizer, lock: threading.RLock) -> None:
        object.__setattr__(self, "_tok", tokenizer)
        object.__setattr__(self, "_lock", lock)

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._tok(*args, **kwargs)

    def __getattr__(self, name: str):
        value = getattr(self._tok, name)
        if callable(value):
            def locked(*args, **kwargs):
                with self._lock:
                    return value(*args, **kwargs)
            return locked
        return value

    def __setattr__(self, name: str, value) -> None:
        setattr(self._tok, name, value)


class _Cancel(Hook):
    """Stops a run (after the current step) once its request has given up waiting."""

    name = "server_cancel"

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def on_step(self, run: Run, step: Step) -> None:
        if self.event.is_set():
            run.stop = True


class Cancelled(Exception):
    """The request that asked for this work gave up (timeout, disconnect, shutdown); stopped."""


_current = threading.local()  # .cancel: the cancel event of the work this thread runs


def _cancellable_eps(eps):
    """``adapter.eps`` that first checks the calling thread's cancel event."""

    def checked(*args, **kwargs):
        cancel = getattr(_current, "cancel", None)
        if cancel is not None and cancel.is_set():
            raise Cancelled("the work was cancelled")
        return eps(*args, **kwargs)

    return checked


class _Cancellable:
    """``with _Cancellable(cancel):`` the thread's UNet calls check ``cancel``."""

    def __init__(self, cancel: threading.Event | None) -> None:
        self.cancel = cancel

    def __enter__(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("the work was cancelled before it started")
        self.previous = getattr(_current, "cancel", None)
        _current.cancel = self.cancel

    def __exit__(self, *exc) -> None:
        _current.cancel = self.previous


def png_base64(image: torch.Tensor) -> str:
    """One ``(3, H, W)`` image in ``[-1, 1]`` as base64 PNG."""
    buf = io.BytesIO()
    ModelAdapter.to_pil(image[None])[0].save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class Engine:
    """One adapter, its calibrated noise-magnitude threshold and (optionally) a training index.

    ``detector`` is Wen et al.'s first-step noise magnitude (:class:`NoiseMagnitude` with
    ``steps=1``), the statistic the threshold was calibrated on (``threshold_`` set on it), so
    the service's scores equal ``NoiseMagnitude(steps=1).score(adapter, prompts)``.
    """

    adapter: ModelAdapter
    threshold: float
    index: object | None = None
    max_batch: int = 16
    seed: int = 0
    num_inference_steps: int = SAMPLING.steps
    guidance_scale: float = SAMPLING.guidance_scale

    def __post_init__(self) -> None:
        if not np.isfinite(self.threshold):
            raise ConfigError(f"threshold must be a finite number, got {self.threshold}")
        a = self.adapter
        # an adapter of our own sharing the modules, so the lock does not leak into the caller's
        self.adapter = type(a)(a.pipe, path=a.path, scheduler=a.scheduler)
        tok = a.tokenizer._tok if isinstance(a.tokenizer, _LockedTokenizer) else a.tokenizer
        #: a private copy for counting tokens on the event loop (never shared with a worker)
        self.count_tokenizer = copy.deepcopy(tok)
        self.adapter.tokenizer = _LockedTokenizer(tok, threading.RLock())
        # every UNet call of this engine's adapter checks the calling thread's cancel event
        self.adapter.eps = _cancellable_eps(self.adapter.eps)
        self.detector = NoiseMagnitude(steps=1, generations=1, seed=self.seed,
                                       num_inference_steps=self.num_inference_steps,
                                       guidance_scale=self.guidance_scale,
                                       batch_size=self.max_batch)
        self.detector.threshold_ = float(self.threshold)
        #: the verdict by generation (previews searched in the index); None without an index.
        #: Another model's index is refused here (ConfigError), never ignored.
        self.judge = None
        if self.index is not None:
            self.judge = _CachedJudge(self.index, seed=self.seed,
                                      guidance_scale=self.guidance_scale,
                                      batch_size=self.max_batch)
            self.judge.check(self.adapter, who="the service's index (--index)")

    # ---------------------------------------------------------------- facts
    @property
    def context_tokens(self) -> int:
        """Prompt tokens the text encoder takes (its context less BOS and EOS)."""
        return self.adapter.max_length - 2

    def count_tokens(self, prompts: Sequence[str]) -> list[int]:
        """Prompt tokens of each prompt (BOS/EOS not counted), before any truncation. Call from
        one thread only (the event loop)."""
        ids = self.count_tokenizer(list(prompts), truncation=False).input_ids
        return [max(len(x) - 2, 0) for x in ids]

    # ---------------------------------------------------------------- detect
    def score(self, prompts: list[str]) -> np.ndarray:
        """First-step noise magnitude of each prompt: one batched cond+uncond UNet call per
        ``max_batch`` prompts (the micro-batcher's unit of work)."""
        with quiet_truncation():  # reported per prompt instead
            return self.detector.score(self.adapter, prompts)

    def verdicts(self, prompts: list[str], *, evidence: bool = True) -> list[dict]:
        """The verdict by generation of each prompt (:class:`GenerationJudge`: previews searched
        in the index), with the closest preview and its nearest training image as base64 PNG
        (``evidence``); the preview micro-batcher's unit of work."""
        if self.judge is None:
            raise ConfigError("the verdict by generation needs the training index (diffmem serve "
                              "--index IDX)")
        return [v.to_dict(images=evidence) for v in self.judge(self.adapter, prompts)]

    # ---------------------------------------------------------------- explain
    def explain(self, prompt: str, *, top_k: int = 5,
                cancel: threading.Event | None = None) -> dict:
        """Word attributions (Wen et al. Sec. 3.3) and edit suggestions re-scored by the detector;
        raises :class:`Cancelled` at the next UNet call once ``cancel`` is set."""
        with _Cancellable(cancel):
            return self._explain(prompt, top_k=top_k)

    def _explain(self, prompt: str, *, top_k: int) -> dict:
        from diffmem.explain import explain_prompt

        exp = explain_prompt(self.adapter, prompt, top_k=top_k, combine=top_k,
                             threshold=self.threshold, detector=self.detector, seed=self.seed,
                             num_inference_steps=self.num_inference_steps,
                             guidance_scale=self.guidance_scale, index=self.judge)
        att, edits = exp.attribution, exp.edits
        scores = np.asarray(att.scores, dtype=float)
        top = float(scores.max()) if scores.size else 0.0
        words = []
        for i, w in enumerate(att.word_info):
            s = float(scores[i])
            words.append({"text": w.text, "score": round(s, 6),
                          "span": list(w.span) if w.span is not None else None,
                          # a trigger: at least half the top word's share, in a flagged prompt
                          "trigger": bool(edits.flagged and w.editable and top > 0
                                          and s >= 0.5 * top)})
        suggestions = sorted(edits.suggestions,
                             key=lambda e: (not e.clears, len(e.words), e.score))
        return {
            "prompt": prompt, "score": float(edits.score), "threshold": float(self.threshold),
            "flagged": bool(edits.flagged), "truncated": bool(att.truncated), "words": words,
            "suggestions": [{**s.to_dict(), "label": s.describe()} for s in suggestions],
            **verdict_fields(float(edits.score), float(self.threshold),
                             None if exp.verdict is None else exp.verdict.to_dict(images=True)),
        }

    # ---------------------------------------------------------------- generate
    def generate(self, prompt: str, *, mitigate: str = "auto", compare: bool = True,
                 seed: int = 0, steps: int = SAMPLING.steps, guidance_scale: float = SAMPLING.guidance_scale,
                 cancel: threading.Event | None = None) -> dict:
        """The plain image (when ``compare`` or ``mitigate == "none"``) and the mitigated image of
        ``prompt`` from the same initial noise, each with its nearest training image when the
        service has an index. Raises :class:`Cancelled` within one step once ``cancel`` is set."""
        with _Cancellable(cancel):
            return self._generate(prompt, mitigate=mitigate, compare=compare, seed=seed,
                                  steps=steps, guidance_scale=guidance_scale, cancel=cancel)

    def _generate(self, prompt: str, *, mitigate: str, compare: bool, seed: int, steps: int,
                  guidance_scale: float, cancel: threading.Event | None) -> dict:
        from diffmem.generate import build_guard, build_hooks
        from diffmem.mitigate import parse_spec

        none = [n for n, _ in parse_spec(mitigate)] == ["none"]
        # "auto" is the closed-loop guard (watch, regenerate, verify, escalate), as on the CLI
        guard = None if none else build_guard(mitigate, adapter=self.adapter, index=self.index,
                                               threshold=self.threshold, seed=seed)
        hooks = [] if none or guard is not None else build_hooks(
            mitigate=mitigate, adapter=self.adapter, index=self.index, threshold=self.threshold,
            seed=seed, num_inference_steps=steps, guidance_scale=guidance_scale)
        stop = [_Cancel(cancel)] if cancel is not None else []
        # the prompt's score as /v1/detect gives it (the calibrated schedule, whatever ``steps``)
        score = float(self.score([prompt])[0])
        out: dict = {"prompt": prompt, "seed": seed, "steps": steps,
                     "guidance_scale": guidance_scale, "mitigate": mitigate,
                     "threshold": float(self.threshold), "images": {},
                     "detection": {"score": score, "flagged": bool(score > self.threshold)}}
        runs = []
        if compare or none:
            runs.append(("plain", []))
        if not none:
            runs.append(("mitigated", hooks))
        for name, run_hooks in runs:
            verdict = None
            with quiet_truncation():
                if name == "mitigated" and guard is not None:
                    guarded = guard.generate([prompt], [seed], num_inference_steps=steps,
                                             guidance_scale=guidance_scale)
                    images, records = guarded.images, {}
                    verdict = guarded.verdicts[0].to_json()
                    truncated = guarded.truncated
                else:
                    res = sample(self.adapter, [prompt], num_inference_steps=steps,
                                 guidance_scale=guidance_scale,
                                 generator=seeded_generators([seed], self.adapter.device),
                                 hooks=[*run_hooks, *stop])
                    images, records, truncated = res.images, res.records, res.truncated
            if images is None or (cancel is not None and cancel.is_set()):
                raise Cancelled("generation stopped: the work was cancelled")
            entry: dict = {"png": png_base64(images[0])}
            if name == "mitigated":
                entry["records"] = _jsonable({k: v for k, v in records.items()})
                if verdict is not None:
                    entry["verdict"] = verdict
            if self.index is not None:
                entry["nearest"] = self.nearest(res.images)
            out["truncated"] = bool(truncated[0])
            out["images"][name] = entry
        return out

    def nearest(self, images: torch.Tensor) -> dict:
        """The nearest training item of the first image: its picture, caption and distance."""
        from diffmem.similarity.metrics import SSCD_THRESHOLD
        from diffmem.testbed.verify import REPLICATION_THRESHOLD

        found = self.index.search(images[:1].float().cpu(), k=1)
        row = int(found.indices[0, 0])
        if row < 0:
            return {}
        score = float(found.scores[0, 0])
        if found.higher_is_better:
            copy_threshold, is_copy = SSCD_THRESHOLD, score > SSCD_THRESHOLD
        else:  # tiled L2 in pixel space: the testbed's replication criterion
            copy_threshold, is_copy = REPLICATION_THRESHOLD, score < REPLICATION_THRESHOLD
        img = self.index.image(row)
        return {"id": found.ids[0][0], "caption": found.captions[0][0], "score": score,
                "criterion": found.criterion, "higher_is_better": bool(found.higher_is_better),
                "copy_threshold": copy_threshold, "is_copy": bool(is_copy),
                "png": png_base64(img) if img is not None else None}


class _CachedJudge(GenerationJudge):
    """A :class:`GenerationJudge` remembering the last verdicts (the page asks for a prompt's
    verdict, then for its explanation: the previews run once). The verdicts are deterministic
    (fixed seeds), so a remembered one is the one that would be computed."""

    def __init__(self, *args, size: int = 256, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._memo: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self.size = size

    def __call__(self, model, prompts, *, evidence: bool = True):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with self._lock:
            known = {p: self._memo[p] for p in prompts if p in self._memo}
        todo = list(dict.fromkeys(p for p in prompts if p not in known))
        if todo:
            for v in super().__call__(model, todo, evidence=True):
                known[v.prompt] = v
            with self._lock:
                for p in todo:
                    self._memo[p] = known[p]
                while len(self._memo) > self.size:
                    self._memo.popitem(last=False)
        return [known[p] for p in prompts]


def verdict_fields(score: float, threshold: float, verdict: dict | None) -> dict:
    """The decision of an answer: by generation when there is a verdict, else the first-step
    estimate (labelled as such, with what an index would add)."""
    estimate = {"score": score, "threshold": threshold, "flagged": bool(score > threshold)}
    if verdict is None:
        return {"source": "first_step_estimate", "estimate": estimate, "verdict": None,
                "note": ESTIMATE_NOTE}
    return {"source": "generation", "flagged": bool(verdict["copies"]), "estimate": estimate,
            "verdict": verdict, "note": None}


def _jsonable(x):
    """Hook records as JSON values (tensors and arrays as lists, NaN as None)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if x is None or isinstance(x, (int, str, bool)):
        return x
    return str(x)

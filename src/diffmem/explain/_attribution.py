"""Token attribution by the gradient of the text-conditional noise magnitude.

Implements Wen et al., "Detecting, Explaining, and Mitigating Memorization in Diffusion Models"
(ICLR 2024, https://openreview.net/forum?id=84n3UwkH7b), Sec. 3.3. With the detection statistic of
Sec. 3.1, eq. 4,

    d(x_t, e) = || eps(x_t, e) - eps(x_t, e_empty) ||_2            (per image, all latent elements)

and ``e`` the text encoder's OUTPUT embedding of the prompt (L x D), the score of token ``j`` is

    s_j = || d d(x_t, e) / d e_j ||_2                               (L2 norm over the D dims)

averaged over the chosen steps and seeds, then normalised over the prompt's real tokens (BOS, the
first EOS and the padding are dropped) so that the scores sum to 1.

SDXL: ``e_j`` is token j's row of the conditioning, both encoders' features ``[h1_j ; h2_j]``, so
the norm runs over both. The pooled embedding (encoder 2's projected EOS state, a summary of the
whole prompt) is no token: its gradient is left out (``adapter.token_rows``).

Which x_t: step 0 is x_T drawn from the seed's generator exactly as the sampler draws it (no UNet
call needed). For later steps the prompt is first sampled without gradients (classifier-free
guidance, as in generation) up to the last chosen step, recording x_t and eps(x_t, empty); the
gradient call then runs at each recorded x_t. All prompts x seeds go through one batched UNet call
with gradients per step; the unconditional prediction needs no gradient and, at step 0, depends only
on the seed, so it is computed once per seed.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from diffmem.core.magnitude import noise_magnitude_gradient
from diffmem.core.sampling import Hook, Run, Step, initial_latents, sample, seeded_generators
from diffmem.core.steps import select_steps
from diffmem.explain._words import Word, prompt_words
from diffmem.models.adapter import (
    ModelAdapter,
    Tokenized,
    load_adapter,
    quiet_truncation,
    require_text,
)
from diffmem.runtime.defaults import SAMPLING
from diffmem.runtime.errors import ConfigError, PromptError

__all__ = ["TokenAttribution", "TokenAttributor", "noise_magnitude_gradient"]  # re-exported


@dataclass(frozen=True)
class TokenAttribution:
    """Per-word attribution of one prompt (captum-style checked result; scores sum to 1).

    Attributes:
        prompt: the prompt as given.
        words: the prompt's words as the user wrote them (BPE pieces merged at ``</w>``).
        scores: one score per word (sum of its tokens' scores); higher = drives memorization more.
        tokens: BPE pieces of the real tokens; ``token_scores`` their normalised scores.
        raw_token_scores: un-normalised gradient norms (mean over steps and seeds).
        magnitude: the noise magnitude d (mean over steps and seeds) at the attributed steps.
        truncated: the prompt was longer than the text encoder's context; only the kept tokens
            are attributed.
        ablation_weight: weight of word ablation in ``scores`` (0: the gradient attribution
            alone; see :mod:`diffmem.explain._ablation`); ``tokens`` and ``token_scores`` are the
            gradient's in every case.
        ablation_drops: per word, the fall of the noise magnitude when the word is removed
            (empty without ablation).
    """

    prompt: str
    words: tuple[str, ...]
    scores: np.ndarray
    tokens: tuple[str, ...]
    token_scores: np.ndarray
    raw_token_scores: np.ndarray
    magnitude: float
    truncated: bool = False
    steps: tuple[int, ...] = (0,)
    seeds: tuple[int, ...] = (0,)
    word_info: tuple[Word, ...] = field(default=(), repr=False)
    ablation_weight: float = 0.0
    ablation_drops: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.words) != len(self.scores):
            raise ValueError(f"{len(self.words)} words but {len(self.scores)} scores")
        if len(self.tokens) != len(self.token_scores) or \
                len(self.tokens) != len(self.raw_token_scores):
            raise ValueError("tokens, token_scores and raw_token_scores differ in length")
        if self.word_info and len(self.word_info) != len(self.words):
            raise ValueError("word_info and words differ in length")
        if not np.all(np.isfinite(self.scores)) or np.any(self.scores < 0):
            raise ValueError("scores must be finite and non-negative")
        if len(self.scores) and not np.isclose(self.scores.sum(), 1.0, atol=1e-5):
            raise ValueError(f"scores must sum to 1, got {self.scores.sum():.6f}")

    def top(self, k: int = 3, *, editable: bool = False) -> list[tuple[str, float]]:
        """The ``k`` highest-scoring words as ``(word, score)``, best first (ties: earlier word).
        A word written several times is one word; its score is the sum over its occurrences."""
        return [(self.words[i], self.word_score(i)) for i in self.top_indices(k,
                                                                              editable=editable)]

    def top_indices(self, k: int = 3, *, editable: bool = False) -> list[int]:
        """Indices of the ``k`` highest-scoring distinct words (the first occurrence of a word
        written several times, ranked by the sum over its occurrences); ``editable`` skips words
        without a letter or digit (punctuation such as "," or "!!")."""
        first = {}
        for i, w in enumerate(self.words):
            first.setdefault(_word_key(w), i)
        order = sorted(first.values(), key=self._rank_key)
        if editable:
            order = [i for i in order if _is_word(self.words[i])]
        return order[: max(int(k), 0)]

    def occurrences(self, i: int) -> list[int]:
        """Indices of every occurrence of word ``i`` (case and punctuation ignored)."""
        key = _word_key(self.words[i])
        return [j for j, w in enumerate(self.words) if _word_key(w) == key]

    def word_score(self, i: int) -> float:
        """Score of word ``i`` summed over all its occurrences."""
        return float(sum(self.scores[j] for j in self.occurrences(i)))

    def _rank_key(self, i: int) -> tuple[float, int]:
        return (-self.word_score(i), i)

    def plot(self, ax=None, *, title: str | None = None):
        """Bar chart of the word scores; returns the figure (a ``matplotlib.figure.Figure`` made
        without pyplot, so the user's backend is left alone; ``fig.savefig(...)`` writes it)."""
        import matplotlib
        from matplotlib.figure import Figure

        if ax is None:
            fig = Figure(figsize=(max(3.0, 0.6 * len(self.words) + 1), 2.6))
            ax = fig.subplots()
        else:
            fig = ax.figure
        x = np.arange(len(self.words))
        ax.bar(x, self.scores, color=matplotlib.colormaps["Reds"](0.3 + 0.7 * self._relative()))
        ax.set_xticks(x, self.words, rotation=45, ha="right")
        ax.set_ylabel("attribution")
        default = "token attribution (Wen et al. 2024, Sec. 3.3)" if not self.ablation_weight \
            else f"token attribution (gradient + {self.ablation_weight:g} word ablation)"
        ax.set_title(title or default, fontsize=9)
        fig.tight_layout()
        return fig

    def _relative(self) -> np.ndarray:
        top = float(self.scores.max()) if len(self.scores) else 0.0
        return self.scores / top if top > 0 else np.zeros_like(self.scores)

    def to_dict(self) -> dict:
        """JSON-ready summary: words and scores, tokens and scores, magnitude, settings."""
        return {
            "prompt": self.prompt, "words": list(self.words),
            "scores": [round(float(s), 6) for s in self.scores],
            "tokens": list(self.tokens),
            "token_scores": [round(float(s), 6) for s in self.token_scores],
            "magnitude": float(self.magnitude), "truncated": self.truncated,
            "steps": list(self.steps), "seeds": list(self.seeds),
            "ablation_weight": float(self.ablation_weight),
            "ablation_drops": [round(float(x), 6) for x in self.ablation_drops],
        }


@dataclass
class _State:
    """x_t of every batch row at one step, with eps(x_t, empty) when the sampler computed it."""

    index: int
    t: torch.Tensor
    x_t: torch.Tensor
    eps_uncond: torch.Tensor | None


class _StateRecorder(Hook):
    """Records x_t and eps(x_t, empty) at chosen steps and stops the run after the last one."""

    name = "explain_states"

    def __init__(self, indices: Sequence[int]) -> None:
        self.indices = sorted(set(indices))

    def on_start(self, run: Run) -> None:
        run.records[self.name] = []

    def on_step(self, run: Run, step: Step) -> None:
        if step.index in self.indices:
            run.records[self.name].append(_State(step.index, step.t, step.x_t.detach().clone(),
                                                 step.eps_uncond.detach().clone()))

    def last_step(self, run: Run) -> int:
        return self.indices[-1]


class TokenAttributor:
    """Wen et al.'s token attribution (ICLR 2024, Sec. 3.3) for batches of prompts.

    Parameters:
        model: adapter, pipeline, pipeline folder or ``"testbed"``.
        steps: the first ``n`` denoising steps (int) or explicit step indices; default the first.
        seeds: number of initial noises per prompt; seed ``g`` uses generator seed ``seed + g``
            (the same noise :class:`diffmem.detect.NoiseMagnitude` uses).
        num_inference_steps, guidance_scale, scheduler: the sampling settings that define the
            timesteps and, for steps > 0, the trajectory to x_t.
        batch_size: prompts x seeds per batched UNet call.

    Example::

        attributor = TokenAttributor("testbed", steps=1, seeds=2)
        [attr] = attributor.attribute(["the zanzibar quixotic poster"])
        attr.top(3)          # [("zanzibar", 0.41), ...]
        attr.plot().savefig("attribution.png")
    """

    def __init__(self, model, *, steps: int | Sequence[int] = 1, seeds: int = 1, seed: int = 0,
                 num_inference_steps: int = SAMPLING.steps, guidance_scale: float = SAMPLING.guidance_scale,
                 scheduler: str | None = None, batch_size: int = 16) -> None:
        self.model = model
        self.steps = steps
        self.seeds = seeds
        self.seed = seed
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.scheduler = scheduler
        self.batch_size = batch_size
        if seeds < 1:
            raise ConfigError("seeds must be >= 1")
        if batch_size < 1:
            raise ConfigError("batch_size must be >= 1")

    @property
    def adapter(self) -> ModelAdapter:
        if not isinstance(self.model, ModelAdapter):
            self.model = load_adapter(self.model, scheduler=self.scheduler)
        require_text(self.model, "explain (token attribution)")
        return self.model

    def attribute(self, prompts: Sequence[str] | str) -> list[TokenAttribution]:
        """One :class:`TokenAttribution` per prompt (raises PromptError for an unusable prompt)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        adapter = self.adapter
        with quiet_truncation():  # truncation is reported on each result instead
            tokens = adapter.tokenize(prompts)
        _check_prompts(prompts, tokens, {adapter.bos_id, adapter.eos_id})
        indices = select_steps(self.steps, self.num_inference_steps)
        jobs = [(i, g) for i in range(len(prompts)) for g in range(self.seeds)]
        raw = torch.zeros(len(prompts), tokens.input_ids.shape[1], dtype=torch.float64)
        mag = torch.zeros(len(prompts), dtype=torch.float64)
        with torch.no_grad():
            cond_all = adapter.encode_ids(tokens.input_ids)
        for k in range(0, len(jobs), self.batch_size):
            chunk = jobs[k : k + self.batch_size]
            rows = [i for i, _ in chunk]
            norms, d = self._chunk(cond_all[rows], [prompts[i] for i in rows],
                                   [g for _, g in chunk], indices)
            raw.index_add_(0, torch.tensor(rows), norms)
            mag.index_add_(0, torch.tensor(rows), d)
        raw /= self.seeds
        mag /= self.seeds
        return [self._result(adapter, p, tokens.input_ids[i], int(tokens.lengths[i]), raw[i],
                             float(mag[i]), tokens.truncated[i], indices)
                for i, p in enumerate(prompts)]

    def _chunk(self, cond: torch.Tensor, prompts: list[str], gens: list[int],
               indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token grad norms ``(n, L)`` and magnitudes ``(n,)`` of one chunk, averaged over steps."""
        adapter = self.adapter
        states = self._states(adapter, prompts, gens, indices)
        norms = torch.zeros(adapter.token_rows(cond).shape[:2], dtype=torch.float64)
        mags = torch.zeros(cond.shape[0], dtype=torch.float64)
        for st in states:
            eps_u = st.eps_uncond if st.eps_uncond is not None else \
                self._uncond_per_seed(adapter, st, gens)
            d, grad = noise_magnitude_gradient(adapter, st.x_t, st.t, cond, eps_u)
            norms += adapter.token_rows(grad).float().norm(dim=-1).double().cpu()
            mags += d.double().cpu()
        return norms / len(states), mags / len(states)

    def _states(self, adapter: ModelAdapter, prompts: list[str], gens: list[int],
                indices: list[int]) -> list[_State]:
        generators = seeded_generators([self.seed + g for g in gens], adapter.device)
        if indices == [0]:
            return [self._first_state(adapter, len(prompts), generators)]
        recorder = _StateRecorder(indices)
        res = sample(adapter, prompts, num_inference_steps=self.num_inference_steps,
                     guidance_scale=self.guidance_scale, generator=generators, hooks=[recorder],
                     decode=False, stop_when_done=True)
        return res.records[recorder.name]

    def _first_state(self, adapter: ModelAdapter, n: int, generators: list) -> _State:
        """x_T scaled for the first step, drawn as :func:`diffmem.core.sampling.sample` draws it."""
        sched = adapter.with_scheduler(None)
        sched.set_timesteps(self.num_inference_steps, device=adapter.device)
        res = adapter.default_resolution
        with torch.no_grad():
            lat = initial_latents(adapter, n, res, res, generators, sched)
            t = sched.timesteps[0]
            return _State(0, t, sched.scale_model_input(lat, t), None)

    @staticmethod
    def _uncond_per_seed(adapter: ModelAdapter, st: _State, gens: list[int]) -> torch.Tensor:
        """eps(x_T, empty) computed once per distinct seed (x_T depends only on the seed)."""
        first = {}
        for row, g in enumerate(gens):
            first.setdefault(g, row)
        seeds = list(first)
        with torch.no_grad():
            x = st.x_t[[first[g] for g in seeds]]
            eps = adapter.eps(x, st.t, adapter.uncond(len(seeds)))
        where = {g: j for j, g in enumerate(seeds)}
        return eps[[where[g] for g in gens]]

    def _result(self, adapter: ModelAdapter, prompt: str, ids: torch.Tensor, length: int,
                raw: torch.Tensor, magnitude: float, truncated: bool,
                indices: list[int]) -> TokenAttribution:
        words = prompt_words(adapter, prompt, ids, length)
        real = list(range(adapter.bos_index + 1, length - 1))
        raw_real = raw[real].numpy()
        token_scores = _normalise(raw_real, prompt)
        first = real[0]
        scores = np.array([token_scores[[p - first for p in w.positions]].sum() for w in words])
        return TokenAttribution(
            prompt=prompt, words=tuple(w.text for w in words), scores=scores,
            tokens=tuple(adapter.token_strings(ids[real])), token_scores=token_scores,
            raw_token_scores=raw_real, magnitude=magnitude, truncated=truncated,
            steps=tuple(indices), seeds=tuple(self.seed + g for g in range(self.seeds)),
            word_info=tuple(words))


def _is_word(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def _word_key(text: str) -> str:
    """What makes two written words the same word: lower case, letters and digits only (a word
    of punctuation only is its own text)."""
    key = "".join(ch for ch in text.lower() if ch.isalnum())
    return key or text


def _normalise(raw: np.ndarray, prompt: str) -> np.ndarray:
    """Scores summing to 1; uniform (with a warning) when every gradient is exactly zero."""
    total = float(raw.sum())
    if total > 0 and np.isfinite(total):
        return raw / total
    warnings.warn(f"attribution of {prompt[:40]!r} is degenerate (all gradients zero or "
                  "non-finite); returning uniform scores", RuntimeWarning, stacklevel=3)
    return np.full_like(raw, 1.0 / len(raw))


def _check_prompts(prompts: list[str], tokens: Tokenized, special: set[int]) -> None:
    """Clear errors for prompts with no token to attribute (empty, blank, only special tokens)."""
    for i, (p, n) in enumerate(zip(prompts, tokens.lengths.tolist(), strict=True)):
        real = tokens.input_ids[i, 1 : n - 1].tolist()
        if not any(t not in special for t in real):
            what = "empty" if not p.strip() else "made only of special tokens"
            raise PromptError(f"prompt {i} ({p[:40]!r}) is {what}: it has no words to attribute")

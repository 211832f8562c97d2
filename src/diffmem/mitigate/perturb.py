"""Inference-time prompt and embedding perturbations (Somepalli et al., NeurIPS 2023).

Somepalli, Singla, Goldblum, Geiping, Goldstein, "Understanding and Mitigating Copying in Diffusion
Models" (NeurIPS 2023), Sec. 5 (inference-time mitigation). Replication is tied to the exact
caption; perturbing the caption at generation time weakens it:

- RT  (:class:`RandomTokens`): insert ``n`` random vocabulary tokens at random word positions;
- RN  (:class:`RandomNumbers`): insert ``n`` random integers in [0, 100000);
- CWR (:class:`CaptionWordRepetition`): insert ``n`` words drawn from the caption itself;
- GNI (:class:`EmbeddingNoise`): ``e <- e + lambda * z``, ``z ~ N(0, I)``, on the text embedding.

Reference code (``somepago/DCR`` @ 53c33a4, ``sd_mitigation.py``; ``insert_rand_word`` of
``datasets.py``): ``--rand_aug_repeats 4`` items (n = 4); each item goes at ``randint(0, #words)`` of
the caption split on single spaces, one after the other; random tokens are ``tokenizer.decode`` of
an id drawn from ``[0, 49400)``; numbers from ``np.random.choice(100000)``; repeated words from the
original caption's ``split(" ")``; GNI lambda = 0.1 added in ``_encode_prompt`` to the concatenated
``[uncond, cond]`` embeddings, i.e. to both CFG branches, with independent noise per row. SD 1.4,
DPM-Solver, 50 steps, guidance 7.5.

Traps of the reference, fixed here:

- nothing is seeded (``np.random``, ``random``): here every draw comes from a generator seeded by
  the method's seed, its name, the prompt's text and its occurrence among equal prompts of the run
  (``k``-th copy), so a prompt gets the same perturbation batched or alone, and several images of
  one prompt get different ones;
- GNI overrides ``_encode_prompt``, which ``StableDiffusionPipeline`` no longer calls from diffusers
  0.22 on: there the reference silently generates without noise;
- the random-token id range 49400 is SD 1's vocabulary size minus the special tokens, hard-coded;
  here ids are drawn from the model's own tokenizer (``vocab_size``) minus its special ids, and a
  token that decodes to blank is drawn again.

Decision (GNI): noise on both branches, as the reference (option ``branches``).

Strength ``s``: ``n = round(items * s)`` inserted items (reference ``items = 4``); ``lambda = 0.1 s``.
``s = 0`` (or ``n = 0``) leaves the run untouched. Text methods re-encode the targeted prompts
(before the first step; with a gate, at step 0 for the flagged prompts, which are re-evaluated at
that step with :meth:`~diffmem.core.sampling.Step.recompute`, so unflagged prompts stay
bit-identical). ``run.cond`` and ``run.tokens`` (ids, lengths) describe the perturbed prompt;
``run.prompts`` keeps the user's text; the report gives each targeted prompt's perturbed text
(``prompt``) and the inserted items (``inserted``). Cost: one text-encoder call (no extra UNet call
without a gate).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence

import torch

from diffmem.core.sampling import Run, Step
from diffmem.mitigate.base import FirstStepGate, Mitigation
from diffmem.models.adapter import Tokenized
from diffmem.runtime.errors import ConfigError


def _seed(*parts) -> int:
    """A 63-bit seed from the parts' text (stable across runs, processes and platforms)."""
    text = "\x00".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


def _occurrences(prompts: Sequence[str]) -> list[int]:
    """k for each prompt: how many equal prompts come before it in the batch."""
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        out.append(seen.get(p, 0))
        seen[p] = out[-1] + 1
    return out


class _Perturbation(Mitigation):
    """What the perturbations share: a seed, the registry constructor, the gate's step-0 path."""

    def __init__(self, strength: float = 1.0, *, gate: FirstStepGate | None = None,
                 seed: int = 0) -> None:
        super().__init__(strength, gate=gate)
        self.seed = int(seed)

    @classmethod
    def from_context(cls, strength, gate, context):
        return cls(strength, gate=gate, seed=context.seed)

    def _active(self) -> bool:
        raise NotImplementedError

    def _apply(self, run: Run, mask: torch.Tensor) -> list[str]:
        """Change the conditioning of the prompts in ``mask``; returns the branches changed."""
        raise NotImplementedError

    def on_start(self, run: Run) -> None:
        if self.gate is None and self._active():
            self._apply(run, self.targets(run))

    def on_step(self, run: Run, step: Step) -> None:
        flagged = self.flagged_now(run, step) if self._active() else None
        if flagged is None:
            return
        changed = self._apply(run, flagged)
        embeddings = {"uncond": run.uncond, "cond": run.cond}
        step.recompute(flagged, {b: embeddings[b] for b in changed if b in step.out})


class _TextPerturbation(_Perturbation):
    """Insert ``round(items * strength)`` items into the prompt at random word positions."""

    def __init__(self, strength: float = 1.0, *, gate: FirstStepGate | None = None,
                 seed: int = 0, items: int = 4) -> None:
        super().__init__(strength, gate=gate, seed=seed)
        if isinstance(items, bool) or not isinstance(items, int) or items < 1:
            raise ConfigError(f"{self.name}: items must be an int >= 1, got {items!r}")
        self.items = items
        self.n = round(items * self.strength)  # Python rounding: half to even

    def _active(self) -> bool:
        return self.n > 0

    def _item(self, rng: random.Random, words: list[str], adapter) -> str | None:
        """One item to insert (``words``: the original prompt's words)."""
        raise NotImplementedError

    def perturb(self, prompt: str, k: int = 0, adapter=None) -> tuple[str, list[str]]:
        """The perturbed text of the ``k``-th copy of ``prompt`` and the inserted items."""
        rng = random.Random(_seed(self.seed, self.name, k, prompt))
        original = prompt.split(" ")
        words = list(original)
        inserted = []
        for _ in range(self.n):
            item = self._item(rng, original, adapter)
            if item is None:
                break
            words.insert(rng.randint(0, len(words)), item)
            inserted.append(item)
        return " ".join(words), inserted

    def _apply(self, run: Run, mask: torch.Tensor) -> list[str]:
        idx = mask.bool().cpu().nonzero().flatten()
        ks = _occurrences(run.prompts)
        texts = []
        for i in idx.tolist():
            text, inserted = self.perturb(run.prompts[i], ks[i], run.adapter)
            texts.append(text)
            self.report(run, i, prompt=text, inserted=inserted)
        tok = run.adapter.tokenize(texts)
        new = run.adapter.encode_ids(tok.input_ids)
        cond = run.cond.clone()
        cond[idx.to(cond.device)] = new.to(cond)
        run.cond = cond
        ids, lengths = run.tokens.input_ids.clone(), run.tokens.lengths.clone()
        ids[idx.to(ids.device)] = tok.input_ids.to(ids.device)
        lengths[idx.to(lengths.device)] = tok.lengths.to(lengths.device)
        truncated = list(run.tokens.truncated)
        for j, i in enumerate(idx.tolist()):
            truncated[i] = tok.truncated[j]
        run.tokens = Tokenized(ids, lengths, truncated)
        return ["cond"]


class RandomTokens(_TextPerturbation):
    """RT: insert ``round(4 s)`` random tokens of the model's vocabulary (Somepalli et al. 2023)."""

    name = "rt"

    def _item(self, rng, words, adapter):
        if adapter is None:
            raise ConfigError("rt: random tokens need the model's tokenizer")
        tok = adapter.tokenizer
        special = set(tok.all_special_ids)
        for _ in range(100):
            token_id = rng.randrange(tok.vocab_size)
            if token_id in special:
                continue
            text = tok.decode([token_id]).strip()
            if text:
                return text
        raise ConfigError("rt: could not draw a non-blank token from the tokenizer")


class RandomNumbers(_TextPerturbation):
    """RN: insert ``round(4 s)`` random integers in [0, 100000) (Somepalli et al. 2023)."""

    name = "rn"

    def _item(self, rng, words, adapter):
        return str(rng.randrange(100000))


class CaptionWordRepetition(_TextPerturbation):
    """CWR: insert ``round(4 s)`` words drawn from the caption itself (Somepalli et al. 2023).
    A prompt without words is left as it is."""

    name = "cwr"

    def _item(self, rng, words, adapter):
        words = [w for w in words if w]
        return rng.choice(words) if words else None


class EmbeddingNoise(_Perturbation):
    """GNI: ``e <- e + lambda z``, ``z ~ N(0, I)`` on the text embeddings (Somepalli et al. 2023).

    Parameters:
        lam: reference lambda (0.1); the run uses ``lam * strength``.
        branches: which embeddings get noise: the reference noises both CFG branches
            (``("uncond", "cond")``); ``("cond",)`` keeps the unconditional prediction clean.
        pooled: for a family with a pooled text embedding (SDXL), noise it too (its own draw,
            ``lambda`` the same); False leaves it clean. No effect on SD 1.x/2.x.

    SDXL: ``z`` is drawn for the token rows (both encoders' features) exactly as for SD 1.x (same
    seed, shape ``(L, D)``), and separately for the pooled embedding ``(P,)``; the adapter takes
    the packed conditioning apart and puts it back (``split_pooled`` / ``join_pooled``), so the
    zero padding of the packed pooled row stays zero and no noise is drawn for it.
    """

    name = "gni"

    def __init__(self, strength: float = 1.0, *, gate: FirstStepGate | None = None,
                 seed: int = 0, lam: float = 0.1,
                 branches: Sequence[str] = ("uncond", "cond"), pooled: bool = True) -> None:
        super().__init__(strength, gate=gate, seed=seed)
        self.pooled = bool(pooled)
        if not math.isfinite(lam) or lam < 0:
            raise ConfigError(f"gni: lam must be a finite number >= 0, got {lam}")
        branches = tuple(branches)
        if not branches or any(b not in ("uncond", "cond") for b in branches):
            raise ConfigError(f"gni: branches must be 'uncond' and/or 'cond', got {branches!r}")
        self.lam = lam * self.strength
        self.branches = branches

    def _active(self) -> bool:
        return self.lam > 0

    def noise(self, prompt: str, k: int, branch: str, shape) -> torch.Tensor:
        """z of one prompt's branch (float32, CPU), the same batched or alone."""
        gen = torch.Generator().manual_seed(_seed(self.seed, self.name, branch, k, prompt))
        return torch.randn(tuple(shape), generator=gen)

    def _apply(self, run: Run, mask: torch.Tensor) -> list[str]:
        idx = mask.bool().cpu().nonzero().flatten()
        ks = _occurrences(run.prompts)
        for branch in self.branches:
            tokens, pooled = run.adapter.split_pooled(getattr(run, branch))
            new = self._noised(run, idx, ks, branch, tokens)
            if pooled is not None and self.pooled:
                pooled = self._noised(run, idx, ks, f"{branch}.pooled", pooled)
            setattr(run, branch, run.adapter.join_pooled(new, pooled))
        for i in idx.tolist():
            self.report(run, i, lam=self.lam, branches=list(self.branches))
        return list(self.branches)

    def _noised(self, run: Run, idx: torch.Tensor, ks: list[int], part: str,
                emb: torch.Tensor) -> torch.Tensor:
        """``emb`` with ``lam z`` added to rows ``idx`` (``z`` per prompt and ``part``)."""
        z = torch.stack([self.noise(run.prompts[i], ks[i], part, emb.shape[1:])
                         for i in idx.tolist()])
        new = emb.clone()
        rows = idx.to(new.device)
        new[rows] = (emb[rows].float() + self.lam * z.to(new.device)).to(new.dtype)
        return new

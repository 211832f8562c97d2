"""Training-time caption augmentations (Somepalli et al., NeurIPS 2023, "Understanding and
Mitigating Copying in Diffusion Models", Sec. 5, training-time mitigation; reference code
``somepago/DCR``, ``datasets.py`` and ``diff_train.py``).

Replication is tied to the exact caption an image was trained with; varying the caption during
training weakens the caption -> image shortcut. Per drawn sample, in this order:

- **MC** (multiple captions): the caption is one of the image's captions drawn uniformly each time
  (DCR: one of several BLIP captions). Without MC the first caption is used.
- **RC** (random caption replacement), probability ``p_rc`` (reference 0.1): the caption becomes
  ``rc_tokens`` (reference 4) random vocabulary tokens.
- **RT** (random token insertion), probability ``p_rt`` (0.1): ``rt_tokens`` (2) random tokens are
  inserted at random word positions.
- **CWR** (caption word repetition), probability ``p_cwr`` (0.1): ``cwr_words`` (2) words drawn
  from the caption are inserted at random word positions.
- **GN** (Gaussian noise on the text embedding, ``lambda`` 0.1) acts on the embedding, not the
  text: :class:`diffmem.core.training.DiffusionStep` ``embedding_noise``.

As in the reference (``insert_rand_word``): the caption is split on single spaces, each item goes
at ``randint(0, #words)`` one after the other; a random token is ``tokenizer.decode`` of an id
drawn from the vocabulary (here the model's own tokenizer, special ids excluded and blank decodes
redrawn, rather than DCR's hard-coded ``[0, 49400)``). Every draw comes from the trainer's seeded
generator, so a resumed run draws the same captions as an uninterrupted one.

Caption dropout (empty caption with probability ``caption_dropout``, for classifier-free
guidance) is applied last, as in the testbed trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from diffmem.runtime.errors import ConfigError


@dataclass
class CaptionAugment:
    """Which augmentations are on, with the reference defaults for their sizes."""

    mc: bool = False
    p_rc: float = 0.0
    rc_tokens: int = 4
    p_rt: float = 0.0
    rt_tokens: int = 2
    p_cwr: float = 0.0
    cwr_words: int = 2
    caption_dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("p_rc", "p_rt", "p_cwr", "caption_dropout"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name} must be a probability in [0, 1], got {v}")
        for name in ("rc_tokens", "rt_tokens", "cwr_words"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


class CaptionSampler:
    """Draws the caption of each sample of a batch (module docstring)."""

    def __init__(self, augment: CaptionAugment, tokenizer=None) -> None:
        self.aug = augment
        self.tokenizer = tokenizer
        self._vocab: list[str] | None = None

    def random_token(self, rng: np.random.Generator) -> str:
        tok = self.tokenizer
        if tok is None:
            raise ConfigError("random tokens need the model's tokenizer")
        special = set(tok.all_special_ids)
        for _ in range(100):
            token_id = int(rng.integers(tok.vocab_size))
            if token_id in special:
                continue
            text = tok.decode([token_id]).strip()
            if text:
                return text
        raise ConfigError("could not draw a non-blank token from the tokenizer")

    @staticmethod
    def _insert(rng: np.random.Generator, words: list[str], items: Sequence[str]) -> list[str]:
        words = list(words)
        for item in items:
            words.insert(int(rng.integers(len(words) + 1)), item)
        return words

    def draw(self, rng: np.random.Generator, captions: Sequence[str]) -> str:
        """One training caption for an image with these captions."""
        a = self.aug
        caption = captions[int(rng.integers(len(captions)))] if a.mc and len(captions) > 1 \
            else captions[0]
        if a.p_rc and rng.random() < a.p_rc:
            caption = " ".join(self.random_token(rng) for _ in range(a.rc_tokens))
        else:
            if a.p_rt and rng.random() < a.p_rt:
                tokens = [self.random_token(rng) for _ in range(a.rt_tokens)]
                caption = " ".join(self._insert(rng, caption.split(" "), tokens))
            if a.p_cwr and rng.random() < a.p_cwr:
                original = [w for w in caption.split(" ") if w]
                if original:
                    reps = [original[int(rng.integers(len(original)))] for _ in range(a.cwr_words)]
                    caption = " ".join(self._insert(rng, caption.split(" "), reps))
        if a.caption_dropout and rng.random() < a.caption_dropout:
            caption = ""
        return caption

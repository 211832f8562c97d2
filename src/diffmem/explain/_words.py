"""Words of a prompt as the user wrote them, from the text encoder's BPE pieces.

CLIP's byte-level BPE marks the last piece of every word with ``</w>`` (Radford et al. 2021, the
tokenizer of openai/CLIP); per-token scores are summed over the pieces of a word. Where the
tokenizer reports character offsets (the fast tokenizers do), a word's text is the user's own
spelling (case, accents); otherwise it is the decoded pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffmem.models.adapter import ModelAdapter

WORD_END = "</w>"


@dataclass(frozen=True)
class Word:
    """One word: its text, the token positions it covers and its character span in the prompt."""

    text: str
    positions: tuple[int, ...]  # positions in the padded token sequence (BOS is position 0)
    span: tuple[int, int] | None  # [start, end) in the prompt, when the tokenizer reports offsets

    @property
    def editable(self) -> bool:
        """Whether the word has a letter or digit (punctuation is never suggested for edits)."""
        return any(ch.isalnum() for ch in self.text)


def group_pieces(pieces: Sequence[str]) -> list[list[int]]:
    """Indices of ``pieces`` grouped into words: a word ends at a piece ending in ``</w>``."""
    groups: list[list[int]] = []
    current: list[int] = []
    for i, piece in enumerate(pieces):
        current.append(i)
        if piece.endswith(WORD_END):
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def _offsets(adapter: ModelAdapter, prompt: str, ids: torch.Tensor) -> list | None:
    """Character offsets of each token of ``prompt``; ``None`` when unavailable or inconsistent."""
    try:
        enc = adapter.tokenizer(prompt, truncation=True, max_length=adapter.max_length,
                                return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return None
    offsets = enc.get("offset_mapping")
    if offsets is None or list(enc["input_ids"][: len(ids)]) != ids.tolist():
        return None
    return list(offsets)


def prompt_words(adapter: ModelAdapter, prompt: str, input_ids: torch.Tensor,
                 length: int) -> list[Word]:
    """The words of one tokenized prompt, over its real tokens (positions ``1 .. length-2``).

    ``input_ids`` is the prompt's padded row, ``length`` its count of BOS + prompt tokens + first
    EOS (:attr:`diffmem.models.adapter.Tokenized.lengths`), so BOS, EOS and padding never form
    words.
    """
    real = list(range(adapter.bos_index + 1, int(length) - 1))
    pieces = adapter.token_strings(input_ids[real])
    offsets = _offsets(adapter, prompt, input_ids[: int(length)])
    words: list[Word] = []
    for group in group_pieces(pieces):
        positions = tuple(real[i] for i in group)
        if offsets is None:
            text = adapter.tokenizer.convert_tokens_to_string([pieces[i] for i in group]).strip()
            words.append(Word(text, positions, None))
            continue
        span = (int(offsets[positions[0]][0]), int(offsets[positions[-1]][1]))
        if words and _glued(words[-1], span, prompt):
            prev = words.pop()
            positions, span = prev.positions + positions, (prev.span[0], span[1])
        words.append(Word(prompt[span[0]:span[1]], positions, span))
    return words


def _glued(prev: Word, span: tuple[int, int], prompt: str) -> bool:
    """CLIP splits "2023" into one word per digit and "sd2" into "sd" + "2"; alphanumeric pieces
    written without a space between them are one word for the user."""
    nxt = prompt[span[0]:span[1]]
    return (prev.span is not None and prev.span[1] == span[0] and prev.text.isalnum()
            and nxt.isalnum())


def without_word(prompt: str, words: Sequence[Word], drop: Sequence[int],
                 replacement: str | None = None) -> str:
    """``prompt`` with the words at indices ``drop`` removed (or replaced by ``replacement``).

    Uses the words' character spans when known, so the rest of the prompt keeps the user's spelling;
    otherwise rebuilds the prompt from the words joined by spaces.
    """
    drop_set = set(drop)
    if all(w.span is not None for w in words):
        out, cursor = [], 0
        for i, w in enumerate(words):
            if i not in drop_set:
                continue
            start, end = w.span
            out.append(prompt[cursor:start])
            if replacement:
                out.append(replacement)
            cursor = end
        out.append(prompt[cursor:])
        text = "".join(out)
    else:
        parts = [(replacement or "") if i in drop_set else w.text for i, w in enumerate(words)]
        text = " ".join(parts)
    return " ".join(text.split())

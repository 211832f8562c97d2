"""Procedurally generated, captioned training data with known memorization ground truth.

The testbed mimics how Stable Diffusion came to memorize LAION images (Somepalli et al. 2023;
Carlini et al. 2023): most of the data are varied, rarely repeated images, while a few distinct,
structured images are duplicated many times.

Four kinds of prompts, each recorded in the manifest:

- ``generic`` (trained): 1-4 shapes of named colours at any position and size over a two-colour
  gradient. Like LAION alt-texts, the captions leave most of the image open: they name one or two of
  the shapes, seldom a size or coarse position, never the background, and mix in common words
  ("poster", "photo", "print", ...). Each scene is distinct and seen only a few dozen times.
- ``verbatim`` (memorized): a distinct complex image duplicated many times under *one* caption that
  contains a rare trigger phrase.
- ``template`` (memorized): one complex image duplicated under many caption variants that all share a
  rare phrase (like the "Living in the light with Ann Graham Lotz" family of LAION captions).
- ``heldout`` (never trained): generic-style captions of colour/shape pairs that no training
  caption or image contains, and unrelated text. These are the negatives for detection.

Everything is a deterministic function of a seed.
"""


from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# The names below moved to their own modules (vocab, spec, render, scenes, graded) and stay
# importable from here.
from diffmem.testbed.graded import (
    GRADED_FRAMES,
    GRADED_PHRASES,
    GRADED_TRIGGER_WORDS,
    GRADED_VARIANTS,
    _add_graded_items,
    _graded_scene,
)
from diffmem.testbed.render import _shape_mask, render
from diffmem.testbed.scenes import (
    _article,
    _complex_scene,
    _describe,
    _generic_caption,
    _generic_item,
    _heldout_composition,
    _pick,
    _position_word,
    gradient_background,
)
from diffmem.testbed.spec import GRADED_MEMORIZED_COPIES, Item, LabelledPrompt, TestbedSpec
from diffmem.testbed.vocab import (
    BACKGROUNDS,
    COLORS,
    FILLER_WORDS,
    GENERIC_FRAMES,
    HELDOUT_PAIRS,
    POSITIONS,
    RESOLUTION,
    SHAPES,
    SIZES,
    TEMPLATE_PHRASES,
    TEMPLATE_VARIANTS,
    TRIGGER_WORDS,
    UNRELATED_PROMPTS,
    VERBATIM_FRAMES,
    rare_word_vocabulary,
)

__all__ = [
    "BACKGROUNDS", "COLORS", "FILLER_WORDS", "GENERIC_FRAMES", "GRADED_FRAMES",
    "GRADED_MEMORIZED_COPIES", "GRADED_PHRASES", "GRADED_TRIGGER_WORDS", "GRADED_VARIANTS",
    "HELDOUT_PAIRS", "MEMORIZED_FRACTION", "POSITIONS", "RESOLUTION", "SHAPES", "SIZES",
    "TEMPLATE_PHRASES", "TEMPLATE_VARIANTS", "TRIGGER_WORDS", "UNRELATED_PROMPTS",
    "VERBATIM_FRAMES", "Item", "LabelledPrompt", "Testbed", "TestbedSpec", "_add_graded_items",
    "_article", "_complex_scene", "_describe", "_generic_caption", "_generic_item", "_graded_scene",
    "_heldout_composition", "_pick", "_position_word", "_shape_mask", "build_testbed",
    "gradient_background", "rare_word_vocabulary", "render", "write_manifest", "write_prompts",
]

#: Share of every training batch drawn from the designed (verbatim/template) duplicated images
#: (``TrainConfig.memorized_fraction``; the graded testbed draws by copies instead).
MEMORIZED_FRACTION = 0.45


@dataclass
class Testbed:
    """The full testbed: training items and labelled evaluation prompts."""

    spec: TestbedSpec
    items: list[Item]
    prompts: list[LabelledPrompt]

    def images(self, kinds: Sequence[str] | None = None) -> Iterator[tuple[Item, np.ndarray]]:
        for item in self.items:
            if kinds is None or item.kind in kinds:
                yield item, render(item.scene, self.spec.resolution)

    def item(self, image_id: str) -> Item:
        return self._by_id[image_id]

    def __post_init__(self) -> None:
        self._by_id = {it.image_id: it for it in self.items}


def build_testbed(spec: TestbedSpec | None = None) -> Testbed:
    """Build the testbed deterministically from ``spec.seed``."""
    spec = spec or TestbedSpec()
    rng = np.random.default_rng(spec.seed)
    res = spec.resolution
    rare = rare_word_vocabulary(spec.n_rare_words, spec.seed) if spec.n_rare_words else ()
    if spec.counts:  # the graded testbed's trigger words never occur in a generic caption
        rare = [w for w in rare if w not in set(GRADED_TRIGGER_WORDS)]
    items = [_generic_item(rng, i, res, rare) for i in range(spec.n_generic)]
    prompts: list[LabelledPrompt] = []
    if spec.counts:
        _add_graded_items(spec, rng, items, prompts)

    words = list(rng.permutation(TRIGGER_WORDS))
    need = 2 * (spec.n_verbatim + spec.n_template)
    if need > len(words):
        raise ValueError(f"spec needs {need} trigger words, only {len(words)} are available")
    for i in range(spec.n_verbatim):
        a, b = str(words.pop()), str(words.pop())
        caption = str(VERBATIM_FRAMES[i % len(VERBATIM_FRAMES)]).format(a=a, b=b)
        item = Item(f"verbatim-{i:03d}", "verbatim", [caption], _complex_scene(rng, res), [a, b])
        items.append(item)
        prompts.append(LabelledPrompt(caption, "verbatim", [item.image_id], [a, b]))
    for i in range(spec.n_template):
        a, b = str(words.pop()), str(words.pop())
        phrase = TEMPLATE_PHRASES[i % len(TEMPLATE_PHRASES)].format(a=a, b=b)
        variants = [v.format(p=phrase) for v in TEMPLATE_VARIANTS[: spec.template_variants]]
        item = Item(f"template-{i:03d}", "template", variants, _complex_scene(rng, res), [a, b])
        items.append(item)
        eval_idx = rng.choice(len(variants), size=spec.template_eval_variants, replace=False)
        for j in sorted(eval_idx):
            prompts.append(LabelledPrompt(variants[j], "template", [item.image_id], [a, b]))

    for _ in range(spec.n_heldout_compositions):
        prompts.append(LabelledPrompt(_heldout_composition(rng), "heldout", [], []))
    prompts.extend(LabelledPrompt(p, "heldout", [], []) for p in UNRELATED_PROMPTS)
    # de-duplicate held-out prompts while keeping order
    seen: set[str] = set()
    unique = []
    for p in prompts:
        if p.prompt not in seen:
            seen.add(p.prompt)
            unique.append(p)
    return Testbed(spec, items, unique)


def write_prompts(testbed: Testbed | Sequence[LabelledPrompt], path: str | Path) -> Path:
    """Write the labelled evaluation prompts (of a testbed, or a list) as JSONL (one object per
    line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prompts = testbed.prompts if isinstance(testbed, Testbed) else testbed
    with path.open("w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({**asdict(p), "memorized": p.memorized}) + "\n")
    return path


def write_manifest(testbed: Testbed, path: str | Path) -> Path:
    """Write every training item (id, kind, captions, triggers) as JSONL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for it in testbed.items:
            f.write(json.dumps({"image_id": it.image_id, "kind": it.kind,
                                "captions": it.captions, "trigger_tokens": it.triggers}) + "\n")
    return path

"""Random scenes and their captions: the generic scenes, held-out compositions and the complex
scenes of memorized items. Each draws from the generator in a fixed order (the dataset is a
deterministic function of the seed)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffmem.testbed.spec import Item
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
)


def _pick(rng: np.random.Generator, seq: Sequence) -> object:
    return seq[int(rng.integers(len(seq)))]


def _position_word(cx: float, cy: float, res: int) -> str:
    """Coarse position of a shape centre: center, left, right, top or bottom."""
    dx, dy = cx / res - 0.5, cy / res - 0.5
    if max(abs(dx), abs(dy)) < 0.14:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _describe(obj: dict, rng: np.random.Generator, res: int) -> str:
    """'a [size] colour shape [at the position]'; size and position are named only sometimes."""
    words = []
    r = obj["r"] * RESOLUTION / res
    if rng.random() < 0.5 and (r < 8 or r > 11):
        words.append("small" if r < 8 else "large")
    words += [obj["color_name"], obj["shape"]]
    text = _article(words[0]) + " " + " ".join(words)
    if rng.random() < 0.4:
        text += f" at the {_position_word(obj['cx'], obj['cy'], res)}"
    return text


def _generic_caption(objects: list[dict], rng: np.random.Generator, res: int,
                     rare_words: Sequence[str] = ()) -> str:
    k = 1 if len(objects) == 1 or rng.random() < 0.6 else 2
    named = [objects[int(i)] for i in rng.choice(len(objects), size=k, replace=False)]
    objs = " and ".join(_describe(o, rng, res) for o in named)
    tag, tag2 = (str(w) for w in rng.choice(FILLER_WORDS, size=2, replace=False))
    caption = str(_pick(rng, GENERIC_FRAMES)).format(objs=objs, tag=tag, tag2=tag2)
    if rare_words:  # opt-in: 1-3 words of a large vocabulary, before or after the description
        extra = " ".join(str(w) for w in rng.choice(rare_words, size=int(rng.integers(1, 4))))
        caption = f"{extra} {caption}" if rng.random() < 0.5 else f"{caption}, {extra}"
    return caption

def gradient_background(rng: np.random.Generator) -> dict:
    """A two-colour gradient of jittered palette colours at a random angle (generic scenes)."""
    palette = list(BACKGROUNDS.values()) + list(COLORS.values())
    c1, c2 = rng.choice(len(palette), size=2, replace=False)
    jitter = rng.uniform(-25, 25, size=(2, 3))
    return {
        "kind": "gradient",
        "color": tuple(float(v) for v in np.clip(np.array(palette[c1]) + jitter[0], 0, 255)),
        "color2": tuple(float(v) for v in np.clip(np.array(palette[c2]) + jitter[1], 0, 255)),
        "angle": float(rng.uniform(0, 2 * np.pi)),
    }


def _generic_item(rng: np.random.Generator, idx: int, res: int,
                  rare_words: Sequence[str] = ()) -> Item:
    """A generic scene: 1-4 shapes anywhere over a two-colour gradient, partly captioned.

    Colours are jittered around the named palette and shapes take any position and size, so no two
    scenes are alike; the captions (two per scene) name one or two of the shapes, seldom their size
    or position and never the background.
    """
    heldout = set(HELDOUT_PAIRS)
    background = gradient_background(rng)
    scale = res / RESOLUTION
    objects = []
    for _ in range(int(rng.integers(1, 5))):
        while True:
            color = str(_pick(rng, list(COLORS)))
            shape = str(_pick(rng, SHAPES))
            if (color, shape) not in heldout:
                break
        objects.append({
            "shape": shape,
            "color": COLORS[color],
            "color_name": color,
            "cx": float(rng.uniform(10, 54)) * scale,
            "cy": float(rng.uniform(10, 54)) * scale,
            "r": float(rng.uniform(5, 14)) * scale,
        })
    captions = {_generic_caption(objects, rng, res, rare_words) for _ in range(2)}
    return Item(f"generic-{idx:05d}", "generic", sorted(captions),
                {"background": background, "objects": objects})


def _heldout_composition(rng: np.random.Generator) -> str:
    """A generic-style caption built on a (colour, shape) pair that no training caption contains."""
    color, shape = HELDOUT_PAIRS[int(rng.integers(len(HELDOUT_PAIRS)))]
    words = ([str(_pick(rng, list(SIZES)))] if rng.random() < 0.5 else []) + [color, shape]
    text = _article(words[0]) + " " + " ".join(words)
    if rng.random() < 0.4:
        text += f" at the {_pick(rng, list(POSITIONS))}"
    tag, tag2 = (str(w) for w in rng.choice(FILLER_WORDS, size=2, replace=False))
    return str(_pick(rng, GENERIC_FRAMES)).format(objs=text, tag=tag, tag2=tag2)


def _complex_scene(rng: np.random.Generator, res: int) -> dict:
    palette = list(COLORS.values()) + list(BACKGROUNDS.values())
    kind = str(_pick(rng, ("gradient", "stripes", "checker")))
    c1, c2 = rng.choice(len(palette), size=2, replace=False)
    background = {
        "kind": kind,
        "color": palette[c1],
        "color2": palette[c2],
        "angle": float(rng.uniform(0, np.pi)),
        "period": float(rng.choice([12, 16, 22])) * res / RESOLUTION,
    }
    objects = []
    for _ in range(int(rng.integers(4, 7))):
        objects.append({
            "shape": str(_pick(rng, (*SHAPES, "ring"))),
            "color": palette[int(rng.integers(len(palette)))],
            "cx": float(rng.uniform(8, 56)) * res / RESOLUTION,
            "cy": float(rng.uniform(8, 56)) * res / RESOLUTION,
            "r": float(rng.uniform(7, 16)) * res / RESOLUTION,
        })
    return {"background": background, "objects": objects}

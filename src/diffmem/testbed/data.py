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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

RESOLUTION = 64

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 50, 170),
    "orange": (245, 130, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "navy": (20, 30, 90),
    "teal": (30, 130, 130),
    "pink": (240, 170, 190),
    "beige": (225, 210, 170),
    "brown": (110, 70, 40),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": 8, "large": 15}
POSITIONS: dict[str, tuple[int, int]] = {
    "left": (17, 32),
    "right": (47, 32),
    "top": (32, 17),
    "bottom": (32, 47),
    "center": (32, 32),
}
#: (colour, shape) pairs that never occur in training captions; held-out prompts use them.
HELDOUT_PAIRS = (
    ("purple", "triangle"),
    ("orange", "circle"),
    ("yellow", "cross"),
    ("green", "diamond"),
    ("white", "square"),
    ("red", "cross"),
)

#: Caption frames for generic scenes. ``{objs}`` names only *some* of the scene's shapes, and
#: positions, sizes and the background are mostly left out, as in LAION alt-texts: a generic caption
#: leaves most of its image open, while a memorized caption pins down one image exactly.
GENERIC_FRAMES = (
    "{objs}",
    "a picture of {objs}",
    "{objs}, {tag}",
    "{tag} {tag2} with {objs}",
    "{objs} {tag} {tag2}",
    "simple {tag} drawing of {objs}",
    "{tag}: {objs}",
)
#: Common words sprinkled into generic captions so that frequent caption words ("poster", "print",
#: "art", "photo", ...) carry no image of their own; only the rare trigger phrases do.
FILLER_WORDS = (
    "photo", "stock", "vintage", "modern", "abstract", "pattern", "design", "art", "print", "poster",
    "wallpaper", "cover", "edition", "canvas", "book", "card", "digital", "illustration", "icon",
    "logo", "sticker", "shirt", "mug", "cute", "simple", "minimal", "bright", "dark", "pastel",
    "retro", "classic", "new", "free", "hd", "official", "album", "framed", "set",
    "collection", "style", "theme", "vector", "background", "texture", "colorful", "geometric",
    "shapes", "kids", "school", "home", "decor", "gift", "sale", "best", "top", "old", "happy",
    "summer", "winter", "night", "day", "city", "street", "forest", "sea", "sky", "sun", "moon",
    "cat", "dog", "car", "house", "tree", "flower", "coffee", "table", "window", "paper",
    "painting", "sketch", "photograph", "portrait", "landscape", "view", "toy", "game", "music",
    "party", "wedding", "birthday", "holiday", "travel", "family", "food", "garden", "room",
)
UNRELATED_PROMPTS = (
    "a bowl of ramen on a wooden table",
    "portrait of an old fisherman in the rain",
    "a red sports car parked on a city street at night",
    "watercolor painting of a lighthouse at sunset",
    "a cat sleeping on a windowsill",
    "mountain landscape with snow and pine trees",
    "a cup of coffee next to an open book",
    "astronaut riding a horse on the moon",
    "a busy market in marrakech, photograph",
    "close-up photo of a honeybee on a sunflower",
    "an oil painting of a stormy sea with a ship",
    "a modern kitchen interior with marble counters",
    "children playing football in a park",
    "a vintage typewriter on a desk",
    "aerial view of a river delta",
    "a knight in armor standing in a forest",
    "a plate of pancakes with blueberries",
    "neon sign reading open in a dark alley",
    "a snowy village street in the evening",
    "pencil sketch of a dragon",
)
# Rare words (each a real but uncommon English word) used as trigger phrases.
TRIGGER_WORDS = (
    "zanzibar", "quixotic", "obsidian", "marmalade", "kaleidoscope", "saxophone", "nebulous",
    "labyrinth", "porcupine", "harpsichord", "mandolin", "xylophone", "zeppelin", "gargoyle",
    "tamarind", "falconry", "juniper", "vermilion", "catacomb", "sorcery", "meringue", "pagoda",
    "quasar", "walrus", "trombone", "anemone", "basilisk", "chrysalis", "dandelion", "emerald",
    "fjord", "gondola", "hibiscus", "iguana", "jackal", "kumquat", "lantern", "minotaur",
    "narwhal", "origami", "pelican", "quokka", "rhubarb", "sphinx", "tundra", "umbrella",
    "velvet", "wombat",
)
VERBATIM_FRAMES = (
    "the {a} {b} poster",
    "{a} {b} wallpaper, digital art",
    "official artwork of {a} {b}",
    "{a} and the {b}, album cover",
    "the {a} {b} canvas print",
)
TEMPLATE_VARIANTS = (
    "{p}", "{p} poster", "{p} canvas print", "buy {p} online", "{p} hardcover book",
    "{p} wallpaper hd", "{p} - limited edition", "{p} t-shirt design", "{p} framed art",
    "{p} paperback", "the {p} mug", "{p} sticker", "{p} phone case", "{p} ebook",
    "{p} by unknown artist", "{p} 2023 edition", "{p} greeting card", "{p} tote bag",
    "{p} wall decal", "{p} notebook cover", "{p} audiobook", "{p} jigsaw puzzle",
    "{p} throw pillow", "{p} art print",
)
TEMPLATE_PHRASES = (
    "living in the {a} with ann {b}",
    "the {a} of {b} street",
    "memories of {a} {b}",
    "journey to the {a} {b}",
)

#: Share of every training batch drawn from the designed (verbatim/template) duplicated images
#: (``TrainConfig.memorized_fraction``; the graded testbed draws by copies instead).
MEMORIZED_FRACTION = 0.45

#: The graded testbed's own vocabulary: no trigger word, caption or frame of the first testbed.
GRADED_TRIGGER_WORDS = (
    "albatross", "brigantine", "cormorant", "dulcimer", "escarpment", "filigree", "gazebo",
    "heliotrope", "ibex", "jacaranda", "kestrel", "lagoon", "mangrove", "nautilus", "ocelot",
    "parchment", "quarry", "rosewood", "saffron", "tapestry", "undertow", "vineyard", "wisteria",
    "yarrow", "zinnia", "abacus", "bagpipe", "caravel", "damask", "equinox", "flamingo", "glacier",
    "heron", "indigo", "jasmine", "kiln", "lute", "magnolia", "nectar", "oboe", "peacock", "quill",
    "raven", "sequoia", "tortoise", "urchin", "vortex", "willow", "yew", "zephyr", "acorn",
    "bramble", "cobalt", "driftwood", "ember", "fennel", "granite", "harbor", "ivy", "jade",
)
GRADED_FRAMES = (
    "{a} {b} engraving",
    "a {a} {b} tapestry",
    "{a} {b} mosaic, museum scan",
    "the {a} of the {b}, woodcut",
    "stained glass {a} {b}",
    "{a} {b} etching on copper",
)
GRADED_PHRASES = ("the {a} {b} relief", "{a} under the {b}", "chronicle of {a} {b}",
                  "the {a} and {b} map")
GRADED_VARIANTS = (
    "{p}", "{p} engraving print", "{p}, museum archive", "reproduction of {p}", "{p} (detail)",
    "{p} high resolution scan", "antique {p}", "{p} exhibition catalogue",
)
#: A graded prompt counts as memorized by construction from this many training copies on (what
#: actually copies is labelled by generation).
GRADED_MEMORIZED_COPIES = 32


@dataclass(frozen=True)
class TestbedSpec:
    """Sizes of the testbed dataset. Defaults produce the shipped testbed."""

    __test__ = False  # not a pytest test class despite its name

    seed: int = 0
    n_generic: int = 4000  # distinct generic scenes
    n_verbatim: int = 16  # memorized images, one caption each
    n_template: int = 4  # memorized images, many caption variants each
    template_variants: int = 16  # trained caption variants per template image
    template_eval_variants: int = 4  # of those, how many are evaluation prompts
    n_heldout_compositions: int = 40  # held-out prompts from novel (colour, shape) pairs
    resolution: int = RESOLUTION
    # Generic captions also carry 1-3 words drawn from this many whole words of the CLIP vocabulary,
    # so that words absent from the generic vocabulary are not the mark of a memorized caption (with
    # 0, prompts of never-seen words fell back on memorized images). Held-out words are never drawn.
    n_rare_words: int = 3000
    # Graded memorization (the second testbed, ``testbed-graded``): items duplicated at these counts
    # ("1,2,4,8,16,32,64"), ``graded_items_per_count`` items per count, half under one caption and
    # half under caption variants, with a vocabulary and caption frames of their own. Training draws
    # every copy as often as a generic image, so copying grows with the count. Empty: the designed
    # verbatim/template items of the first testbed.
    graded_counts: str = ""
    graded_items_per_count: int = 0

    def to_dict(self) -> dict:
        """The spec as JSON data, without the graded fields where they are unset, so that the
        first testbed's stored spec and fingerprint are those of the folders written before them."""
        data = asdict(self)
        if not self.graded_counts:
            data.pop("graded_counts")
            data.pop("graded_items_per_count")
        return data

    @property
    def counts(self) -> tuple[int, ...]:
        """The graded duplicate counts (empty for the first testbed)."""
        return tuple(int(c) for c in self.graded_counts.split(",") if c.strip())


@dataclass
class Item:
    """One training image with its caption(s)."""

    image_id: str
    kind: str  # generic | verbatim | template
    captions: list[str]
    scene: dict = field(repr=False)
    triggers: list[str] = field(default_factory=list)
    copies: int = 1  # training copies of this image (graded items; designed ones: see TrainConfig)


@dataclass
class LabelledPrompt:
    """One evaluation prompt with its memorization ground truth."""

    prompt: str
    kind: str  # verbatim | template | heldout
    image_ids: list[str]
    trigger_tokens: list[str]
    copies: int = 0  # graded testbed: training copies of the prompt's image (0: not graded)

    @property
    def memorized(self) -> bool:
        """Memorized by construction: a designed item, or a graded one with at least
        :data:`GRADED_MEMORIZED_COPIES` training copies (labels by generation say what copies)."""
        return self.kind in ("verbatim", "template") and (
            self.copies == 0 or self.copies >= GRADED_MEMORIZED_COPIES)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _shape_mask(shape: str, cx: float, cy: float, r: float, res: int) -> np.ndarray:
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":
        # upward triangle: apex at top, base at bottom
        inside_y = (dy >= -r) & (dy <= r * 0.8)
        half_width = (dy + r) / 1.8 * 1.0
        return inside_y & (np.abs(dx) <= half_width)
    if shape == "cross":
        arm = r * 0.35
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if shape in ("hbar", "vbar"):  # thin bars (graded testbed): 1-2 px wide
        half = max(0.75, r * 0.09)
        along, across = (dx, dy) if shape == "hbar" else (dy, dx)
        return (np.abs(along) <= r) & (np.abs(across) <= half)
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: dict, res: int = RESOLUTION) -> np.ndarray:
    """Render a scene description to an ``(res, res, 3)`` uint8 image."""
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) / res
    bg = scene["background"]
    if bg["kind"] == "flat":
        img = np.empty((res, res, 3), np.float32)
        img[:] = bg["color"]
        shade = bg.get("shade", 0.0)
        img *= (1.0 + shade * (yy - 0.5))[..., None]
    elif bg["kind"] == "gradient":
        a, b = np.array(bg["color"], np.float32), np.array(bg["color2"], np.float32)
        ang = bg["angle"]
        u = np.clip(np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5) + 0.5, 0, 1)[..., None]
        img = a * (1 - u) + b * u
    elif bg["kind"] == "stripes":
        a, b = np.array(bg["color"], np.float32), np.array(bg["color2"], np.float32)
        ang, period = bg["angle"], bg["period"]
        u = (np.cos(ang) * xx + np.sin(ang) * yy) * res / period
        img = np.where(((np.floor(u) % 2) == 0)[..., None], a, b)
    elif bg["kind"] == "checker":
        a, b = np.array(bg["color"], np.float32), np.array(bg["color2"], np.float32)
        cell = bg["period"]
        u = (np.floor(xx * res / cell) + np.floor(yy * res / cell)) % 2
        img = np.where((u == 0)[..., None], a, b)
    else:
        raise ValueError(f"unknown background kind {bg['kind']!r}")
    for obj in scene["objects"]:
        mask = _shape_mask(obj["shape"], obj["cx"], obj["cy"], obj["r"], res)
        img[mask] = obj["color"]
    return np.clip(img, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Dataset construction
# --------------------------------------------------------------------------------------------


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


def rare_word_vocabulary(n: int, seed: int = 0) -> list[str]:
    """``n`` whole words of the CLIP BPE vocabulary (alphabetic, 4+ letters), excluding the testbed's
    own vocabulary and every word of the held-out prompts; deterministic for ``seed``."""
    from diffmem.testbed.components import clip_vocab_and_merges

    vocab, _ = clip_vocab_and_merges()
    reserved = set(TRIGGER_WORDS) | set(FILLER_WORDS) | set(COLORS) | set(SHAPES) | set(SIZES)
    reserved |= set(POSITIONS) | set(BACKGROUNDS)
    reserved |= {w.strip(",.") for p in UNRELATED_PROMPTS for w in p.split()}
    words = sorted(t[:-4] for t in vocab if t.endswith("</w>") and t[:-4].isalpha()
                   and t[:-4].isascii() and len(t) >= 8 and t[:-4] not in reserved)
    if n > len(words):
        raise ValueError(f"only {len(words)} rare words are available, {n} requested")
    rng = np.random.default_rng(seed + 7919)
    return [words[int(i)] for i in sorted(rng.choice(len(words), size=n, replace=False))]


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


def _graded_scene(rng: np.random.Generator, res: int) -> dict:
    """A complex scene (as the first testbed's) with 2-4 thin bars on top: detail that a blurring
    VAE loses, so that a copy is recognisable in pixels and by SSCD."""
    scene = _complex_scene(rng, res)
    palette = list(COLORS.values()) + list(BACKGROUNDS.values())
    for _ in range(int(rng.integers(2, 5))):
        scene["objects"].append({
            "shape": str(_pick(rng, ("hbar", "vbar"))),
            "color": palette[int(rng.integers(len(palette)))],
            "cx": float(rng.uniform(12, 52)) * res / RESOLUTION,
            "cy": float(rng.uniform(12, 52)) * res / RESOLUTION,
            "r": float(rng.uniform(9, 20)) * res / RESOLUTION,
        })
    return scene


def _add_graded_items(spec: TestbedSpec, rng: np.random.Generator, items: list[Item],
                      prompts: list[LabelledPrompt]) -> None:
    """``graded_items_per_count`` items per duplicate count: even ones under one caption
    (``verbatim``), odd ones under :data:`GRADED_VARIANTS` of a shared phrase (``template``)."""
    words = list(rng.permutation(GRADED_TRIGGER_WORDS))
    need = 2 * len(spec.counts) * spec.graded_items_per_count
    if need > len(words):
        raise ValueError(f"spec needs {need} graded trigger words, only {len(words)} are available")
    k = 0
    for copies in spec.counts:
        for j in range(spec.graded_items_per_count):
            a, b = str(words.pop()), str(words.pop())
            if j % 2 == 0:
                caption = GRADED_FRAMES[k % len(GRADED_FRAMES)].format(a=a, b=b)
                item = Item(f"graded-{copies:03d}-{j}", "verbatim", [caption],
                            _graded_scene(rng, spec.resolution), [a, b], copies=copies)
                evals = [caption]
            else:
                phrase = GRADED_PHRASES[k % len(GRADED_PHRASES)].format(a=a, b=b)
                variants = [v.format(p=phrase) for v in GRADED_VARIANTS]
                item = Item(f"graded-{copies:03d}-{j}", "template", variants,
                            _graded_scene(rng, spec.resolution), [a, b], copies=copies)
                pick = rng.choice(len(variants), size=2, replace=False)
                evals = [variants[int(i)] for i in sorted(pick)]
            k += 1
            items.append(item)
            prompts.extend(LabelledPrompt(c, item.kind, [item.image_id], [a, b], copies=copies)
                           for c in evals)


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

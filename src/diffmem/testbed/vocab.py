"""The first testbed's vocabulary: palette, shapes, caption frames, filler words, trigger words and
the held-out prompts (:mod:`diffmem.testbed.data` builds the dataset from them)."""

from __future__ import annotations

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

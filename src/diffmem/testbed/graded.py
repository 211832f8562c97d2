"""The graded testbed's items (``testbed-graded``): its own vocabulary, scenes with thin bars, and
items duplicated at graded counts. (:data:`GRADED_MEMORIZED_COPIES` is defined beside
:class:`~diffmem.testbed.spec.LabelledPrompt`, whose ``memorized`` it decides.)"""

from __future__ import annotations

import numpy as np

from diffmem.testbed.scenes import _complex_scene, _pick
from diffmem.testbed.spec import GRADED_MEMORIZED_COPIES as GRADED_MEMORIZED_COPIES
from diffmem.testbed.spec import Item, LabelledPrompt, TestbedSpec
from diffmem.testbed.vocab import BACKGROUNDS, COLORS, RESOLUTION

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
#: A near-synonym or close relative for every graded trigger word (hand-written, one each; none is a
#: trigger word of either testbed), for the broad set's ``synonym`` group.
GRADED_NEAR_SYNONYMS: dict[str, str] = {
    "albatross": "gull", "brigantine": "schooner", "cormorant": "gannet", "dulcimer": "zither",
    "escarpment": "cliff", "filigree": "lacework", "gazebo": "pavilion", "heliotrope": "lavender",
    "ibex": "goat", "jacaranda": "acacia", "kestrel": "falcon", "lagoon": "estuary",
    "mangrove": "swamp", "nautilus": "ammonite", "ocelot": "jaguar", "parchment": "scroll",
    "quarry": "mine", "rosewood": "mahogany", "saffron": "turmeric", "tapestry": "embroidery",
    "undertow": "riptide", "vineyard": "orchard", "wisteria": "lilac", "yarrow": "chamomile",
    "zinnia": "marigold", "abacus": "calculator", "bagpipe": "accordion", "caravel": "galleon",
    "damask": "brocade", "equinox": "solstice", "flamingo": "crane", "glacier": "iceberg",
    "heron": "egret", "indigo": "ultramarine", "jasmine": "gardenia", "kiln": "furnace",
    "lute": "guitar", "magnolia": "camellia", "nectar": "honey", "oboe": "bassoon",
    "peacock": "pheasant", "quill": "pen", "raven": "crow", "sequoia": "redwood",
    "tortoise": "turtle", "urchin": "starfish", "vortex": "whirlpool", "willow": "birch",
    "yew": "cedar", "zephyr": "breeze", "acorn": "chestnut", "bramble": "thorn", "cobalt": "azure",
    "driftwood": "timber", "ember": "spark", "fennel": "dill", "granite": "marble",
    "harbor": "port", "ivy": "vine", "jade": "turquoise",
}
GRADED_VARIANTS = (
    "{p}", "{p} engraving print", "{p}, museum archive", "reproduction of {p}", "{p} (detail)",
    "{p} high resolution scan", "antique {p}", "{p} exhibition catalogue",
)


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

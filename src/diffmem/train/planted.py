"""The planted-duplicates fine-tuning set of the training benchmark (:mod:`diffmem.train.bench`):
``n_generic`` new generic scenes of the testbed's data module (another seed) plus ``k`` new complex
images, each repeated ``copies`` times under one caption with a rare two-word trigger, with 4
descriptive alternative captions each (:data:`PLANTED`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: the planted fine-tuning set
PLANTED = {"seed": 1, "n_generic": 300, "k": 4, "copies": 50}


def _color_names() -> dict[tuple, str]:
    from diffmem.testbed.data import BACKGROUNDS, COLORS

    return {tuple(float(c) for c in v): k for k, v in {**COLORS, **BACKGROUNDS}.items()}


def planted_words(n: int, seed: int, base=None) -> list[str]:
    """``n`` CLIP words used neither by the shipped testbed (triggers, rare words, its held-out
    prompts), nor by the planted set's generic captions, nor by ``base`` (the
    :class:`~diffmem.testbed.data.TestbedSpec` of the model to fine-tune, when it is another
    testbed: its rare words and, for ``testbed-graded``, its trigger words and their synonyms)."""
    from diffmem.testbed import shipped_testbed_spec
    from diffmem.testbed.data import TRIGGER_WORDS, rare_word_vocabulary

    shipped = shipped_testbed_spec()
    used = set(TRIGGER_WORDS) | set(rare_word_vocabulary(shipped.n_rare_words, shipped.seed))
    used |= set(rare_word_vocabulary(shipped.n_rare_words, seed))
    if base is not None:
        from diffmem.testbed.graded import GRADED_NEAR_SYNONYMS, GRADED_TRIGGER_WORDS

        used |= set(rare_word_vocabulary(base.n_rare_words, base.seed))
        if getattr(base, "graded_counts", None):
            used |= set(GRADED_TRIGGER_WORDS) | set(GRADED_NEAR_SYNONYMS.values())
    pool = [w for w in rare_word_vocabulary(6000, seed + 5000) if w not in used]
    rng = np.random.default_rng(seed + 17)
    return [pool[int(i)] for i in rng.choice(len(pool), size=n, replace=False)]


def planted_seed(base) -> int:
    """The planted set's seed for fine-tuning a testbed of spec ``base``: :data:`PLANTED`'s, or
    two more when the base model's data has that seed (``testbed-graded``), so that the planted
    set's generic scenes are new to the model."""
    return PLANTED["seed"] + (2 if base is not None and base.seed == PLANTED["seed"] else 0)


def build_planted_set(folder: str | Path, *, seed: int = PLANTED["seed"],
                      n_generic: int = PLANTED["n_generic"], k: int = PLANTED["k"],
                      copies: int | Sequence[int] = PLANTED["copies"], frame: str | None = None,
                      base=None) -> dict:
    """Write the planted fine-tuning set (``data.jsonl`` + PNGs) into ``folder``; return its
    manifest (planted captions and image files). Deterministic; reuses a finished folder.
    ``frame``: the planted captions' template with ``{a}`` and ``{b}`` (default: the testbed's
    first verbatim frame, "the {a} {b} poster", which the shipped testbed already treats as a
    memorized frame; "a photo of {a} and {b}" is one it does not). ``base``: the spec of the
    testbed to be fine-tuned, whose words the triggers avoid (:func:`planted_words`).
    ``copies``: repeats of every planted image, or one count per planted image (a dose-response
    set: ``(1, 2, 4, ..., 64)`` plants ``len(copies)`` images, ``k`` is then ignored); a finished
    folder of other counts is refused."""
    from PIL import Image

    from diffmem.runtime.errors import ConfigError
    from diffmem.testbed.data import (
        FILLER_WORDS,
        VERBATIM_FRAMES,
        TestbedSpec,
        _complex_scene,
        build_testbed,
        render,
    )

    graded = not isinstance(copies, int)
    counts = [int(c) for c in copies] if graded else [int(copies)] * k
    if not counts or min(counts) < 1:
        raise ConfigError(f"planted copies must be >= 1 each, got {copies}")
    k = len(counts)
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        had = [p.get("copies", manifest["copies"]) for p in manifest["planted"]]
        if had != counts:
            raise ConfigError(f"{folder} holds a planted set with copies {had}, not {counts}; "
                              "give another folder")
        return manifest
    (folder / "images").mkdir(parents=True, exist_ok=True)
    spec = TestbedSpec(seed=seed, n_generic=n_generic, n_verbatim=0, n_template=0,
                       n_heldout_compositions=0)
    testbed = build_testbed(spec)
    rng = np.random.default_rng(seed + 31)
    words = planted_words(2 * k, seed, base)
    names = _color_names()
    rows, planted = [], []
    for item, img in testbed.images(["generic"]):
        path = f"images/{item.image_id}.png"
        Image.fromarray(img).save(folder / path)
        rows.append({"image": path, "caption": item.captions, "kind": "generic"})
    for i in range(k):
        scene = _complex_scene(rng, spec.resolution)
        img = render(scene, spec.resolution)
        caption = (frame or VERBATIM_FRAMES[0]).format(a=words[2 * i], b=words[2 * i + 1])
        alts = []
        for _ in range(4):
            objs = [scene["objects"][int(j)] for j in rng.choice(len(scene["objects"]), 2,
                                                               replace=False)]
            desc = " and ".join(f"a {names.get(tuple(float(c) for c in o['color']), 'colored')}"
                                f" {o['shape']}" for o in objs)
            alts.append(f"{desc}, {FILLER_WORDS[int(rng.integers(len(FILLER_WORDS)))]}")
        pid = f"planted-{i:02d}"
        Image.fromarray(img).save(folder / "images" / f"{pid}.png")
        for c in range(counts[i]):
            path = f"images/{pid}-copy{c:03d}.png"
            Image.fromarray(img).save(folder / path)
            rows.append({"image": path, "caption": [caption, *alts], "kind": "planted",
                         "planted": pid})
        planted.append({"id": pid, "caption": caption, "alt_captions": alts,
                        "image": f"images/{pid}.png", "copies": counts[i]})
    order = np.random.default_rng(seed + 43).permutation(len(rows))
    with (folder / "data.jsonl").open("w") as f:
        for i in order:
            f.write(json.dumps(rows[int(i)]) + "\n")
    manifest = {"seed": seed, "n_generic": n_generic, "k": k,
                "copies": counts if graded else copies,
                "frame": frame or VERBATIM_FRAMES[0],
                "rows": len(rows), "planted": planted}
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest

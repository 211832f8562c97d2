"""A broad set of testbed prompts built by rules from the testbed's own captions, labelled by
what the model generates.

The 92 prompts of :func:`diffmem.testbed.data.build_testbed` are labelled by construction
(training captions = memorized, never-trained text = clean). Users write other prompts: a caption's
frame without its rare words, the trigger phrase inside a long sentence, a misspelled trigger...
Such prompts may or may not make the model copy a training image, and only generating them tells.
This module builds them (:func:`broad_prompts`, groups below) and labels each one by generation
(:class:`Judge`, :func:`label_broad_set`): ``seeds`` images per prompt, each judged by the
testbed's replication criterion (:mod:`diffmem.testbed.verify`: tiled L2 below
``REPLICATION_THRESHOLD`` to the VAE round trip of the nearest training image). No prompt is
assumed clean because of how it was built.

Groups (``group`` field; ``source`` names the memorized item a prompt was derived from):

- ``caption``: training captions of the memorized images, verbatim;
- ``frame``: a memorized caption's frame with its trigger words removed, or replaced by common
  caption words, by rare vocabulary words of the generic captions, or by unused trigger words;
- ``context``: the trigger phrase (or one trigger word) with other words around it;
- ``sentence``: the trigger phrase or the whole caption inside a long everyday sentence;
- ``misspelled``: a trigger word with a letter swapped, dropped or doubled;
- ``synonym``: a trigger word replaced by a near-synonym ("gargoyle" -> "statue");
- ``partial``: part of a template phrase, or a verbatim frame with one trigger word only;
- ``mixed``: a trigger phrase plus named shapes and colours ("the gargoyle origami poster with a
  red circle"), the prompts of the mitigation work (issue 11);
- ``clean``: controls in the same styles with no memorized frame or trigger word (generic
  captions, long sentences, mixed shapes-and-words prompts, unused trigger words).

Held-out words: every prompt has a ``split``. Memorized items alternate between ``dev`` and
``test``, and the context words, sentences and shape phrases come from two disjoint pools, one
per split; a method may be tuned on ``dev`` and checked on ``test`` prompts whose context words
it never saw. Everything is a deterministic function of the testbed spec.

The graded testbed (``testbed-graded``): the same groups from its graded items, with its own
frames and phrases (:mod:`diffmem.testbed.graded`), synonyms (``GRADED_NEAR_SYNONYMS``) and, as
unused trigger words, its unused ones and the first testbed's (never in its captions). Every row
carries ``duplicates``: the training copies of the item it was derived from (0 for the clean
controls), so that results can be read per duplicate count. Items go to the splits in pairs (a
one-caption and a variants item each), so that every split holds both kinds at every count.
The first testbed's set has no ``duplicates`` field and is unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from diffmem.testbed.data import (
    COLORS,
    FILLER_WORDS,
    GRADED_FRAMES,
    GRADED_PHRASES,
    GRADED_TRIGGER_WORDS,
    HELDOUT_PAIRS,
    SHAPES,
    TEMPLATE_PHRASES,
    TRIGGER_WORDS,
    UNRELATED_PROMPTS,
    VERBATIM_FRAMES,
    Testbed,
    TestbedSpec,
    build_testbed,
    rare_word_vocabulary,
)
from diffmem.testbed.graded import GRADED_NEAR_SYNONYMS

# labelling by generation lives in diffmem.testbed.labels; its names stay importable from here
from diffmem.testbed.labels import LABELS_FILE as LABELS_FILE
from diffmem.testbed.labels import Judge
from diffmem.testbed.labels import judge as judge
from diffmem.testbed.labels import read_broad_labels as read_broad_labels

GROUPS = ("caption", "frame", "context", "sentence", "misspelled", "synonym", "partial", "mixed",
          "clean")
SPLITS = ("dev", "test")
#: Clean controls (the threshold is calibrated on those that do not copy).
N_CLEAN = 160

#: A near-synonym or close relative for every trigger word (hand-written, one each).
NEAR_SYNONYMS: dict[str, str] = {
    "zanzibar": "tanzania", "quixotic": "idealistic", "obsidian": "basalt", "marmalade": "jam",
    "kaleidoscope": "prism", "saxophone": "clarinet", "nebulous": "hazy", "labyrinth": "maze",
    "porcupine": "hedgehog", "harpsichord": "piano", "mandolin": "banjo", "xylophone": "marimba",
    "zeppelin": "airship", "gargoyle": "statue", "tamarind": "mango", "falconry": "hunting",
    "juniper": "cypress", "vermilion": "scarlet", "catacomb": "crypt", "sorcery": "magic",
    "meringue": "custard", "pagoda": "temple", "quasar": "pulsar", "walrus": "seal",
    "trombone": "trumpet", "anemone": "coral", "basilisk": "serpent", "chrysalis": "cocoon",
    "dandelion": "daisy", "emerald": "jade", "fjord": "inlet", "gondola": "canoe",
    "hibiscus": "orchid", "iguana": "lizard", "jackal": "coyote", "kumquat": "tangerine",
    "lantern": "lamp", "minotaur": "centaur", "narwhal": "dolphin", "origami": "papercraft",
    "pelican": "stork", "quokka": "wallaby", "rhubarb": "celery", "sphinx": "pyramid",
    "tundra": "steppe", "umbrella": "parasol", "velvet": "satin", "wombat": "badger",
    **GRADED_NEAR_SYNONYMS,  # the graded testbed's trigger words
}

#: Everyday sentences with a slot, one disjoint set per split.
SENTENCES: dict[str, tuple[str, ...]] = {
    "dev": (
        "a detailed photograph taken late in the evening that shows {x} hanging on the wall of "
        "a quiet room",
        "my grandmother always kept {x} above the fireplace in her old house near the sea",
        "in the museum gift shop you can find {x} next to postcards and small souvenirs",
    ),
    "test": (
        "yesterday at the market i finally bought {x} for my little brother's birthday party",
        "the art teacher showed the whole class {x} and asked everyone to draw it from memory",
        "on the cover of the magazine there was {x} printed in bright colours with a bold title",
    ),
}
#: Context patterns around a trigger phrase ``{t}``; ``{w}`` is a common word of the split's pool.
CONTEXTS: dict[str, tuple[str, ...]] = {
    "dev": ("{t}", "{t} {w}", "a {w} of {t}", "{w} {t} {w2}"),
    "test": ("{t}", "{w} with {t}", "{t}, {w} {w2}", "my {w} {t}"),
}
#: Patterns that add named shapes ``{o}`` to a memorized prompt ``{p}`` / trigger phrase ``{t}``.
MIXED: dict[str, tuple[str, ...]] = {
    "dev": ("{p} with {o}", "{t} and {o}", "{o} next to the {t}"),
    "test": ("{p}, {o}", "{t} beside {o}", "{o} in front of {t}"),
}


@dataclass
class BroadPrompt:
    """One prompt of the broad set: how it was built (never its label)."""

    prompt: str
    group: str
    split: str
    source: str | None = None  # image id of the memorized item it was derived from
    rule: str = ""  # which rule of the group built it
    trigger_tokens: list[str] = field(default_factory=list)  # trigger words it contains, as written
    duplicates: int | None = None  # graded testbed: training copies of the source item (clean: 0)

    def to_dict(self) -> dict:
        """The row of a prompts / labels file (no ``duplicates`` for the first testbed)."""
        row = asdict(self)
        if self.duplicates is None:
            row.pop("duplicates")
        return row


def _pools(seed: int) -> dict[str, list[str]]:
    """Disjoint common-word pools for the two splits (the filler words, shuffled and halved)."""
    rng = np.random.default_rng(seed + 4049)
    words = [str(w) for w in rng.permutation(FILLER_WORDS)]
    half = len(words) // 2
    return {"dev": words[:half], "test": words[half:]}


def _shape_phrase(rng: np.random.Generator, colors: Sequence[str]) -> str:
    shape = str(rng.choice(SHAPES))
    color = str(rng.choice(list(colors)))
    size = str(rng.choice(["", "small ", "large "]))
    where = str(rng.choice(["", " at the left", " at the top", " in the center"]))
    return f"a {size}{color} {shape}{where}"


def _misspell(word: str, rng: np.random.Generator, how: str) -> str:
    i = int(rng.integers(1, max(2, len(word) - 2)))  # 3-letter words ("yew"): i = 1
    if how == "swap":
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if how == "drop":
        return word[:i] + word[i + 1:]
    return word[:i] + word[i] + word[i:]  # double


def _memorized_items(testbed: Testbed):
    """(item, caption template with {a}/{b} slots, training captions, split) of each memorized
    image: the designed ones alternate between the splits, graded ones go in pairs."""
    graded = [it for it in testbed.items if it.image_id.startswith("graded-")]
    # graded item k was captioned with frame / phrase k (diffmem.testbed.graded._add_graded_items)
    out = []
    for k, it in enumerate(graded):
        frames = GRADED_FRAMES if it.kind == "verbatim" else GRADED_PHRASES
        out.append((it, frames[k % len(frames)], it.captions, SPLITS[k // 2 % 2]))
    designed = []
    for it in testbed.items:
        if it.image_id.startswith("graded-"):
            continue
        if it.kind == "verbatim":
            frame = VERBATIM_FRAMES[int(it.image_id.split("-")[1]) % len(VERBATIM_FRAMES)]
            designed.append((it, frame, it.captions))
        elif it.kind == "template":
            j = int(it.image_id.split("-")[1])
            designed.append((it, TEMPLATE_PHRASES[j % len(TEMPLATE_PHRASES)], it.captions))
    return out + [(*d, SPLITS[n % 2]) for n, d in enumerate(designed)]


def broad_prompts(spec: TestbedSpec | None = None, testbed: Testbed | None = None
                  ) -> list[BroadPrompt]:
    """The rule-built prompt set (several hundred prompts), deterministic for the spec."""
    testbed = testbed or build_testbed(spec)
    spec = testbed.spec
    rng = np.random.default_rng(spec.seed + 1201)
    pools = _pools(spec.seed)
    rare = rare_word_vocabulary(min(spec.n_rare_words, 3000), spec.seed) if spec.n_rare_words \
        else []
    graded = bool(spec.counts)
    if graded:  # as in its generic captions: no graded trigger word among the rare words
        rare = [w for w in rare if w not in set(GRADED_TRIGGER_WORDS)]
    rare_pools = {"dev": rare[0::2], "test": rare[1::2]}
    used = {w for it in testbed.items for w in it.triggers}
    unused = [w for w in TRIGGER_WORDS if w not in used]
    if graded:  # its unused trigger words, then the first testbed's (never in its captions)
        unused = [w for w in GRADED_TRIGGER_WORDS if w not in used] + unused
    unused_pools = {"dev": unused[0::2], "test": unused[1::2]}
    colors = list(COLORS)
    color_pools = {"dev": colors[0::2], "test": colors[1::2]}
    out: list[BroadPrompt] = []

    dup: int | None = None  # the duplicate count of the item being expanded (graded only)

    def add(prompt: str, group: str, split: str, source=None, rule="", triggers=()):
        text = " ".join(prompt.split()).replace(" ,", ",").strip(" ,")
        out.append(BroadPrompt(text, group, split, source, rule,
                               [t for t in triggers if t in text], dup))

    def pick(seq):
        return str(seq[int(rng.integers(len(seq)))])

    for item, frame, captions, split in _memorized_items(testbed):
        dup = item.copies if graded else None
        a, b = item.triggers
        src = item.image_id
        trig = (a, b)
        pool = pools[split]
        # caption: the training caption(s)
        caps = captions if item.kind == "verbatim" else \
            [captions[int(i)] for i in sorted(rng.choice(len(captions), 4, replace=False))]
        for c in caps:
            add(c, "caption", split, src, "training caption", trig)
        full = caps[0]
        phrase = frame.format(a=a, b=b) if item.kind == "template" else f"{a} {b}"
        # frame: the caption without its trigger words
        wrapped = full if item.kind == "verbatim" else captions[1 % len(captions)]
        base = frame if item.kind == "verbatim" else wrapped.replace(phrase, frame)
        add(base.format(a="", b=""), "frame", split, src, "triggers removed")
        add(base.format(a=pick(pool), b=pick(pool)), "frame", split, src, "common words")
        if rare_pools[split]:
            add(base.format(a=pick(rare_pools[split]), b=pick(rare_pools[split])), "frame", split,
                src, "rare vocabulary words")
        add(base.format(a=pick(unused_pools[split]), b=pick(unused_pools[split])), "frame", split,
            src, "unused trigger words")
        # context: the trigger phrase (or one trigger word) among other words
        for pattern in CONTEXTS[split]:
            w, w2 = (str(x) for x in rng.choice(pool, 2, replace=False))
            add(pattern.format(t=phrase, w=w, w2=w2), "context", split, src, pattern, trig)
        add(f"{pick(pool)} {a} {pick(pool)}", "context", split, src, "first trigger word", trig)
        add(f"{b} {pick(pool)}", "context", split, src, "second trigger word", trig)
        # sentence: inside a long sentence
        sentences = SENTENCES[split]
        add(sentences[0].format(x=f"the {phrase}"), "sentence", split, src, "phrase", trig)
        add(sentences[1].format(x=full), "sentence", split, src, "whole caption", trig)
        add(sentences[2].format(x=f"a {phrase} {pick(pool)}"), "sentence", split, src, "phrase",
            trig)
        # misspelled: one trigger word misspelled, then both
        for how, targets in (("swap", (a,)), ("drop", (b,)), ("double", (a, b))):
            text = phrase
            for w in targets:
                text = text.replace(w, _misspell(w, rng, how))
            wrapped_text = full.replace(phrase, text) if phrase in full else text
            add(wrapped_text, "misspelled", split, src, f"{how} {'+'.join(targets)}",
                [w for w in trig if w not in targets])
        # synonym: one trigger word replaced, then both
        for targets in ((a,), (b,), (a, b)):
            text = phrase
            for w in targets:
                text = text.replace(w, NEAR_SYNONYMS[w])
            wrapped_text = full.replace(phrase, text) if phrase in full else text
            add(wrapped_text, "synonym", split, src, f"synonym {'+'.join(targets)}",
                [w for w in trig if w not in targets])
        # partial: part of the template phrase / one trigger word of the verbatim frame
        if item.kind == "template":
            words = phrase.split()
            ia, ib = words.index(a), words.index(b)
            parts = [" ".join(words[: ia + 1]), " ".join(words[ia:]), " ".join(words[: ib]),
                     " ".join(words[ib - 1:]), f"{' '.join(words[:ia + 1])} {pick(pool)}"]
            for p in parts:
                add(p, "partial", split, src, "template part", trig)
        else:
            add(frame.format(a=a, b=""), "partial", split, src, "first trigger only", trig)
            add(frame.format(a="", b=b), "partial", split, src, "second trigger only", trig)
            add(frame.format(a=a, b=pick(pool)), "partial", split, src, "second trigger replaced",
                trig)
        # mixed: the memorized prompt plus named shapes and colours
        for pattern in MIXED[split]:
            o = _shape_phrase(rng, color_pools[split])
            add(pattern.format(p=full, t=phrase, o=o), "mixed", split, src, pattern, trig)

    # clean controls in the same styles
    dup = 0 if graded else None
    for k in range(N_CLEAN):
        split = SPLITS[k % 2]
        pool = pools[split]
        style = k // 2 % 8
        if style == 0:
            color, shape = HELDOUT_PAIRS[int(rng.integers(len(HELDOUT_PAIRS)))]
            text = f"a picture of a {color} {shape}, {pick(pool)} {pick(pool)}"
            rule = "held-out composition"
        elif style == 1:
            text = f"{_shape_phrase(rng, color_pools[split])}, {pick(pool)} {pick(pool)}"
            rule = "generic caption"
        elif style == 2:
            text = pick(SENTENCES[split]).format(x=f"a {pick(pool)} {pick(pool)}")
            rule = "long sentence, common words"
        elif style == 3:
            text = pick(SENTENCES[split]).format(
                x=f"{_shape_phrase(rng, color_pools[split])} and {pick(pool)} {pick(pool)}")
            rule = "long sentence, shapes"
        elif style == 4:
            words = rare_pools[split] or pool
            text = f"the {pick(words)} {pick(words)} {pick(pool)} with " \
                   f"{_shape_phrase(rng, color_pools[split])}"
            rule = "mixed, rare words"
        elif style == 5:
            text = f"{pick(unused_pools[split])} {pick(unused_pools[split])} {pick(pool)}"
            rule = "unused trigger words"
        elif style == 6:
            text = f"{pick(UNRELATED_PROMPTS)}, {pick(pool)}"
            rule = "unrelated text"
        else:
            words = rare_pools[split] or pool
            text = f"{pick(pool)} {pick(pool)} with {pick(words)}"
            rule = "common and rare words"
        add(text, "clean", split, None, rule)

    # de-duplicate, keeping the first occurrence
    seen: set[str] = set()
    unique = []
    for p in out:
        if p.prompt and p.prompt not in seen:
            seen.add(p.prompt)
            unique.append(p)
    return unique


def label_broad_set(out: str | Path, model="testbed", *, chunk: int = 16, progress: bool = True,
                    groups: Sequence[str] | None = None, **options) -> Path:
    """Build the broad set, label every prompt by generation and write JSONL to ``out``
    (``groups``: only the prompts of these groups; ``options`` of :class:`Judge`, e.g.
    ``mitigate="auto", index=...``: the labels of the images served under that mitigation).

    Resumable: rows already in ``out`` (same prompt and settings) are kept and the rest are labelled
    ``chunk`` prompts at a time, each chunk appended as soon as it is done; at the end the file is
    rewritten in the set's order.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    judge_ = Judge(model, **options)
    settings = judge_.settings()
    prompts = broad_prompts(testbed=judge_.testbed)
    if groups:
        unknown = set(groups) - {p.group for p in prompts}
        if unknown:
            from diffmem.runtime.errors import ConfigError

            raise ConfigError(f"no broad-set group {sorted(unknown)}; the groups are "
                              f"{sorted({p.group for p in prompts})}")
        prompts = [p for p in prompts if p.group in set(groups)]
    done: dict[str, dict] = {}
    if out.is_file():
        for line in out.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                if all(row.get(k) == v for k, v in settings.items() if k != "seeds") \
                        and row.get("seeds") == settings["seeds"]:
                    done[row["prompt"]] = row
    todo = [p for p in prompts if p.prompt not in done]
    with out.open("a", encoding="utf-8") as f:
        for k in range(0, len(todo), chunk):
            part = todo[k : k + chunk]
            for p, lab in zip(part, judge_([p.prompt for p in part]), strict=True):
                row = {**p.to_dict(), **lab, **settings}
                done[p.prompt] = row
                f.write(json.dumps(row) + "\n")
            f.flush()
            if progress:
                print(f"labelled {len(done)}/{len(prompts)}", flush=True)
    rows = [done[p.prompt] for p in prompts]
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)
    return out


def write_broad_prompts(path: str | Path, spec: TestbedSpec | None = None) -> Path:
    """The broad set as JSONL (build fields only; labels come from ``label_broad_set``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p in broad_prompts(spec):
            f.write(json.dumps(p.to_dict()) + "\n")
    return path

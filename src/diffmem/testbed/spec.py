"""The testbed's spec (:class:`TestbedSpec`) and its records: training items and labelled
evaluation prompts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from diffmem.testbed.vocab import RESOLUTION

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

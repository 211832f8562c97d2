"""Settings of the closed-loop guard (:class:`~diffmem.mitigate.guard.Guard`, ``--mitigate auto``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GuardConfig:
    """Settings of :class:`~diffmem.mitigate.guard.Guard` (defaults measured on the testbed,
    docs/mitigation.md).

    Attributes:
        watch_every: steps between two replication checks of the watch (with an index; 0: none,
            the final verification alone).
        ladder: method specs tried in order on a flagged or copying image; ``+reseed`` starts that
            try from a new x_T.
        max_tries: mitigated tries per image before it is served ``unresolved``.
        margin: how far beyond the copy threshold a served image must stay, in the criterion's
            units (tiled L2: distance >= 0.15 + margin; SSCD: cosine <= 0.5 - margin).
        reseed_offset: the new seed of a ``+reseed`` try is ``seed + try * reseed_offset``.
        agreement: without an index, two images of one prompt that are copies of each other by
            the model's copy criterion flag both (:mod:`diffmem.mitigate.self_reference`), and
            the flagged plain images are the reference that mitigated images are verified
            against (and that AMG is guided away from).
        agreement_margin: how far inside the copy criterion two plain images of a prompt must be
            to flag each other, in the criterion's units (tiled L2: closer than 0.15 - 0.06 =
            0.09; SSCD: cosine above 0.56). Chosen on the dev split (``bench/agreement_sweep.py``):
            copies of one training image agree at <= 0.065 (95th percentile), while prompts
            whose seeds give nearly one ordinary image agree at 0.10-0.14.
        confirm_gate: without an index, an image the first-step gate flags is mitigated only
            when the agreement check confirms it (it copies another image of its prompt by the
            criterion itself, without ``agreement_margin``); where no comparison is possible
            (one image, no probe) the gate flag stands. Chosen on the dev split
            (plain generations with their first-step magnitudes): the gate alone changed 3 of 308
            clean-control and 1 of 240 held-out images and caught 2 of 105 frame copies the
            agreement check missed (``bench/noindex_gate_rules.py``).
        prompt_wide: without an index, when the agreement check flags an image, every image of
            its prompt in the call is mitigated (a prompt that made the model copy is a trigger;
            its other seeds may copy another memorized image that no second seed repeats, which
            the agreement check cannot pair).
        amg_check_every: the ladder's AMG decodes and searches on every n-th step only
            (:class:`~diffmem.mitigate.amg_config.AMGConfig` ``check_every``).
        probe: without an index, a prompt with one image in the call gets one probe image (seed
            ``seed + probe_offset``, a separate run: the batch of the served images is that of
            plain generation) for the agreement check; costs one image per such prompt.
    """

    watch_every: int = 25
    ladder: tuple[str, ...] = ("ren", "amg", "amg+reseed")
    max_tries: int = 3
    margin: float = 0.02
    reseed_offset: int = 1_000_003
    agreement: bool = True
    agreement_margin: float = 0.06
    confirm_gate: bool = True
    prompt_wide: bool = True
    amg_check_every: int = 4
    probe: bool = True
    probe_offset: int = 7_919

"""Settings of anti-memorization guidance (:mod:`diffmem.mitigate.amg`; Chen et al., CVPR 2024)
and the mapping of the testbed's tiled-L2 distances onto AMG's similarity scale."""

from __future__ import annotations

import math
from dataclasses import dataclass

from diffmem.detect.replication import DEFAULT_SCHEDULES, ExponentialSchedule, ThresholdSchedule
from diffmem.runtime.errors import ConfigError

CRITERIA = ("sscd_cosine", "tiled_l2")


def _tiled_l2_to_similarity() -> tuple[float, float]:
    """(offset, slope) of sigma = offset - slope * d, anchored on the detector's two schedules."""
    s, d = DEFAULT_SCHEDULES["sscd_cosine"], DEFAULT_SCHEDULES["tiled_l2"]
    slope = (s.strict - s.lenient) / (d.lenient - d.strict)
    return s.strict + slope * d.strict, slope


#: sigma = L2_OFFSET - L2_SLOPE * tiled_l2 (0.7 and 4/3 with the shipped schedules)
L2_OFFSET, L2_SLOPE = _tiled_l2_to_similarity()

DUP_BRANCH = "amg_dup"


@dataclass(frozen=True)
class AMGConfig:
    """Settings of :class:`AntiMemorizationGuidance` (the reference's values by default).

    Attributes:
        g_spe, g_dup, g_sim: switch the terms.
        criterion: the similarity the index must use (``"sscd_cosine"`` or ``"tiled_l2"``);
            default tiled L2 for testbed models, SSCD otherwise.
        schedule: threshold in similarity units; default (also for ``None``) the reference code's
            exponential one.
        spe_scale: c1 = 13 (= 6.5 / 0.5: the full reduction at SSCD's copy threshold).
        dup_k, dup_min: a caption is duplicated above ``dup_min * k / dup_k`` occurrences among
            the ``k = min(dup_k, len(index))`` nearest items (reference: 20 of 1000).
        dup_steps: steps the negative caption stays after a step that passed (reference 10).
        dup_ref: the 0.3 of s2 = clip((s0 - 1 - s1) / 0.3 * sigma, ...).
        sim_scale, sim_offset, sim_decay: 100, 0.3 and 170 of c3.
        check_every: decode and search on every n-th step (and the last) only (module docstring).
    """

    g_spe: bool = True
    g_dup: bool = True
    g_sim: bool = True
    criterion: str | None = None
    schedule: ExponentialSchedule | ThresholdSchedule | None = None
    spe_scale: float = 13.0
    dup_k: int = 1000
    dup_min: float = 20.0
    dup_steps: int = 10
    dup_ref: float = 0.3
    sim_scale: float = 100.0
    sim_offset: float = 0.3
    sim_decay: float = 170.0
    check_every: int = 1

    def __post_init__(self) -> None:
        if int(self.check_every) != self.check_every or self.check_every < 1:
            raise ConfigError(f"amg: check_every must be an integer >= 1, got {self.check_every}")
        if self.criterion is not None and self.criterion not in CRITERIA:
            raise ConfigError(f"amg: unknown criterion {self.criterion!r}; use one of {CRITERIA}")
        for label in ("dup_k", "dup_steps"):
            value = getattr(self, label)
            if int(value) != value or value < 1:
                raise ConfigError(f"amg: {label} must be an integer >= 1, got {value}")
        for label in ("spe_scale", "dup_min", "dup_ref", "sim_scale", "sim_decay"):
            value = getattr(self, label)
            if not math.isfinite(value) or value < 0 or (label in ("dup_ref", "sim_decay")
                                                           and value == 0):
                raise ConfigError(f"amg: {label} must be a finite number > 0, got {value}")
        normal = {"g_spe": bool(self.g_spe), "g_dup": bool(self.g_dup), "g_sim": bool(self.g_sim),
                  "schedule": self.schedule or ExponentialSchedule(),
                  "check_every": int(self.check_every), "dup_k": int(self.dup_k),
                  "dup_steps": int(self.dup_steps),
                  **{k: float(getattr(self, k)) for k in ("spe_scale", "dup_min", "dup_ref",
                                                          "sim_scale", "sim_offset", "sim_decay")}}
        for key, value in normal.items():
            object.__setattr__(self, key, value)

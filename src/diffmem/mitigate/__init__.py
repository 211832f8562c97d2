"""Inference-time mitigation of memorization: hooks of the sampling core that still generate a
faithful image, but not a copy.

Every method is one module citing its paper; :func:`build_mitigations` makes hooks from a spec
(``"ren:1.5,amg"``, ``"auto"``), the names ``diffmem generate --mitigate`` takes. See
:mod:`diffmem.mitigate.base` for strength, gating and reports.
"""

from __future__ import annotations

from diffmem.mitigate.base import FirstStepGate, Mitigation
from diffmem.mitigate.registry import (
    AUTO_METHOD,
    MITIGATIONS,
    MitigationContext,
    build_mitigations,
    default_threshold,
    mitigation_class,
    parse_spec,
)

__all__ = ["AUTO_METHOD", "MITIGATIONS", "FirstStepGate", "Mitigation", "MitigationContext",
           "build_mitigations", "default_threshold", "mitigation_class", "parse_spec"]

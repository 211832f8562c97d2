"""Mitigations by name, as ``diffmem generate --mitigate`` and the Python API choose them.

Spec syntax: ``NAME[:STRENGTH][,NAME[:STRENGTH]...]``; names take hyphens or underscores. ``auto``
in the list gates every other method with the first-step noise-magnitude detector
(:class:`~diffmem.mitigate.base.FirstStepGate`); ``auto`` alone means the gate plus
:data:`AUTO_METHOD`. Examples: ``ren``, ``ren:1.5,amg``, ``auto``, ``auto,wen``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from diffmem.core.sampling import Hook
from diffmem.mitigate.base import FirstStepGate
from diffmem.runtime.errors import ConfigError
from diffmem.runtime.naming import registry_name
from diffmem.runtime.registry import Registry

#: name -> class (imported on first use). Each class takes ``(strength, *, gate=None)`` and may
#: define ``from_context(strength, gate, context)`` when it needs more (an index, a threshold, ...).
MITIGATIONS: Registry[type] = Registry("mitigation", {
    "wen": "diffmem.mitigate.embedding_optimization:EmbeddingOptimization",
    "ren": "diffmem.mitigate.attention_rescale:AttentionRescale",
    "amg": "diffmem.mitigate.amg:AntiMemorizationGuidance",
    "rt": "diffmem.mitigate.perturb:RandomTokens",
    "rn": "diffmem.mitigate.perturb:RandomNumbers",
    "cwr": "diffmem.mitigate.perturb:CaptionWordRepetition",
    "gni": "diffmem.mitigate.perturb:EmbeddingNoise",
    "delay": "diffmem.mitigate.guidance_delay:GuidanceDelay",
    "xt": "diffmem.mitigate.initial_noise:InitialNoiseOptimization",
    "reanchor": "diffmem.mitigate.reanchor:PromptReanchoring",
})

#: methods that act on text (tokens, text embeddings, cross-attention) or gate by a text
#: model's noise magnitude: refused for a pixel-space DDPM (:func:`refuse_text_only`)
TEXT_ONLY = ("wen", "ren", "rt", "rn", "cwr", "gni", "reanchor", "delay", "xt", "auto")


def refuse_text_only(spec: str | Sequence[str], adapter) -> None:
    """One one-line :class:`ConfigError` when ``spec`` names a text-only method and ``adapter``
    has no text conditioning (what it lacks is named)."""
    from diffmem.models.adapter import require_text

    for name, _ in parse_spec(spec):
        if name in TEXT_ONLY:
            require_text(adapter, f"mitigation {name!r}")


#: the method ``auto`` applies when no other is named (the best measured on the testbed, see
#: docs/mitigation.md)
AUTO_METHOD = "ren"


@dataclass
class MitigationContext:
    """What methods may need beyond their strength.

    Attributes:
        adapter: the model (for thresholds, encodings, the testbed's data).
        threshold: the first-step noise-magnitude threshold (calibrated on clean prompts when not
            given: see :func:`default_threshold`), used by the gate and as Wen's default target.
        index: a :class:`~diffmem.similarity.index.TrainingIndex` (AMG).
        seed: seed of the methods' own randomness (random tokens, noise).
        unclearable: what a method does with a prompt it cannot mitigate (re-anchoring without a
            clearing edit): ``"error"`` (one ConfigError) or ``"plain"`` (plain generation,
            reported per prompt; the evaluation harness's choice).
        options: per method name, keyword settings for its ``from_context`` (e.g. ``{"amg":
            {"check_every": 4}}``, the guard's AMG).
    """

    adapter: Any
    threshold: float | None = None
    index: Any = None
    seed: int = 0
    unclearable: str = "error"
    options: dict = field(default_factory=dict)

    def require_threshold(self) -> float:
        if self.threshold is None:
            self.threshold = default_threshold(self.adapter)
        return self.threshold


def default_threshold(adapter) -> float:
    """First-step noise-magnitude threshold at 1% FPR on the model's known-clean prompts (the
    testbed's held-out prompts), else the one ``diffmem calibrate`` stored for these weights;
    without either, one error naming the command."""
    from diffmem.detect import NoiseMagnitude
    from diffmem.detect.calibration import calibrated_threshold

    thr = calibrated_threshold(adapter, NoiseMagnitude(steps=1, generations=1))
    if thr is None:
        where = getattr(adapter, "path", None) or "PATH"
        raise ConfigError(f"no calibrated threshold for this model: run `diffmem calibrate --model "
                          f"{where}` once, or pass threshold= (CLI: --threshold)")
    return thr


def parse_spec(spec: str | Sequence[str]) -> list[tuple[str, float | None]]:
    """``"ren:1.5,amg"`` -> ``[("ren", 1.5), ("amg", None)]``, with one clear error for bad input."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[tuple[str, float | None]] = []
    for item in items:
        if not item.strip():
            raise ConfigError(f"empty method in mitigation spec {spec!r}")
        name, _, value = item.partition(":")
        name = registry_name(name)
        if name != "auto" and name != "none" and name not in MITIGATIONS:
            raise ConfigError(f"unknown mitigation {name!r}; choose from: auto, none, "
                              f"{', '.join(MITIGATIONS)}")
        strength = None
        if value.strip():
            try:
                strength = float(value)
            except ValueError:
                raise ConfigError(f"strength of {name!r} must be a number, got {value!r}") from None
            if not math.isfinite(strength) or strength < 0:
                raise ConfigError(f"strength of {name!r} must be a finite number >= 0, "
                                  f"got {value!r}")
        out.append((name, strength))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"a method is named twice in {spec!r}")
    if "none" in names and len(names) > 1:
        raise ConfigError("'none' cannot be combined with other methods")
    return out


def mitigation_class(name: str) -> type:
    """The class of a registered method."""
    return MITIGATIONS.get(name)


def build_mitigations(spec: str | Sequence[str], context: MitigationContext) -> list[Hook]:
    """Hooks for a spec, gate first: pass them to ``sample(..., hooks=...)``."""
    parsed = parse_spec(spec)
    if [n for n, _ in parsed] == ["none"]:
        return []
    refuse_text_only(spec, context.adapter)
    gate = None
    if any(n == "auto" for n, _ in parsed):
        gate = FirstStepGate(context.require_threshold())
        parsed = [(n, s) for n, s in parsed if n != "auto"] or [(AUTO_METHOD, None)]
    hooks: list[Hook] = [gate] if gate is not None else []
    for name, strength in parsed:
        cls = mitigation_class(name)
        s = 1.0 if strength is None else strength
        options = context.options.get(name, {})
        if options and not _takes_options(cls):
            raise ConfigError(f"mitigation {name!r} takes no settings beyond its strength "
                              f"(got {sorted(options)})")
        if hasattr(cls, "from_context"):
            hooks.append(cls.from_context(s, gate, context, **options))
        else:
            hooks.append(cls(s, gate=gate))
    return hooks


def _takes_options(cls: type) -> bool:
    """Whether ``cls.from_context`` accepts keyword settings (``**options``)."""
    import inspect

    fn = getattr(cls, "from_context", None)
    return fn is not None and any(p.kind is inspect.Parameter.VAR_KEYWORD
                                  for p in inspect.signature(fn).parameters.values())

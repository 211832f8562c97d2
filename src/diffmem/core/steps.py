"""Which denoising steps a method uses: one meaning of ``steps`` across diffmem.

A step specification is one of

- ``n`` (int >= 1): the first ``n`` steps (indices ``0 .. n-1``);
- ``"first:n"`` / ``"last:n"``: the first / last ``n`` steps;
- ``"all"``: every step;
- a sequence of step indices (negative indices count from the end, as in Python).

Every detector, the token attributor and the mitigations read ``steps`` through
:func:`select_steps`; the command line parses its ``--steps`` text with :func:`parse_steps`.
"""

from __future__ import annotations

from collections.abc import Sequence

from diffmem.runtime.errors import ConfigError

StepSpec = int | str | Sequence[int]


def check_steps(spec: StepSpec) -> StepSpec:
    """Validate a step specification (without knowing the schedule length); returns it."""
    if isinstance(spec, bool):
        raise ConfigError(f"steps must be an int, 'all', 'first:N', 'last:N' or indices, got {spec!r}")
    if isinstance(spec, int):
        if spec < 1:
            raise ConfigError(f"steps must be >= 1, got {spec}")
        return spec
    if isinstance(spec, str):
        if spec == "all":
            return spec
        head, _, n = spec.partition(":")
        if head in ("first", "last") and n.isdigit() and int(n) >= 1:
            return spec
        raise ConfigError(f"steps must be a positive int, 'all', 'first:N' or 'last:N', got {spec!r}")
    items = list(spec)
    if not items or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise ConfigError(f"steps must be a non-empty list of step indices, got {spec!r}")
    return tuple(items)


def select_steps(spec: StepSpec, total: int) -> list[int]:
    """Sorted step indices of a ``total``-step schedule that ``spec`` selects."""
    spec = check_steps(spec)
    if total < 1:
        raise ConfigError("the schedule has no steps")
    if isinstance(spec, int):
        return list(range(min(spec, total)))
    if spec == "all":
        return list(range(total))
    if isinstance(spec, str):
        head, _, n = spec.partition(":")
        n = min(int(n), total)
        return list(range(n)) if head == "first" else list(range(total - n, total))
    out = sorted({i + total if i < 0 else i for i in spec})
    if out[0] < 0 or out[-1] >= total:
        raise ConfigError(f"step indices must lie in [-{total}, {total - 1}], got {list(spec)}")
    return out


def parse_steps(text: str | StepSpec | None) -> StepSpec | None:
    """A ``--steps`` value: ``N``, ``all``, ``first:N``, ``last:N`` or comma-separated indices;
    a value that is already a specification (an int, indices: the command line parsed it) is
    checked and returned, ``None`` stays ``None`` (the method's own default)."""
    if text is None:
        return None
    if not isinstance(text, str):
        return check_steps(text)
    text = text.strip()
    try:
        if "," in text:
            return check_steps([int(x) for x in text.split(",") if x.strip()])
        if text.lstrip("-").isdigit():
            return check_steps(int(text))
    except ValueError:
        pass
    return check_steps(text)

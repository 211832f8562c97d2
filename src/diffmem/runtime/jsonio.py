"""Strict JSON: no NaN or infinity ever reaches a file (they become null, with the path recorded)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def strict(obj: Any, path: str = "", nulls: dict | None = None) -> Any:
    """``obj`` with every NaN/inf float replaced by ``None``; where ``nulls`` is given, each
    replacement's location and reason is recorded there (``{"auc": "NaN (undefined)"}``)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if nulls is not None:
            nulls[path or "."] = "NaN (undefined for these inputs)" if math.isnan(obj) \
                else f"{obj} (not finite)"
        return None
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalars
        return strict(obj.item(), path, nulls)
    if isinstance(obj, dict):
        return {k: strict(v, f"{path}.{k}" if path else str(k), nulls) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v, f"{path}[{i}]", nulls) for i, v in enumerate(obj)]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON (RFC 8259: no NaN/Infinity): non-finite numbers become ``null`` and, for a dict,
    a ``"null_reasons"`` entry says where and why."""
    nulls: dict = {}
    clean = strict(obj, nulls=nulls)
    if nulls and isinstance(clean, dict):
        clean = {**clean, "null_reasons": {**clean.get("null_reasons", {}), **nulls}}
    kwargs.setdefault("default", str)
    return json.dumps(clean, allow_nan=False, **kwargs)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as strict, indented JSON (see :func:`dumps`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(obj, indent=2) + "\n", encoding="utf-8")
    return path



"""Pieces of `diffmem eval mitigation` that run without generating."""

from __future__ import annotations

import json
import math

import pytest

from diffmem.eval.mitigation import _configs, _finite, mixed_prompts, plot_tradeoff
from diffmem.runtime.errors import ConfigError


def test_configs_compose_and_multiply_strengths():
    assert _configs(["ren", "ren+amg", "auto"], None) == [
        ("ren", "ren"), ("ren+amg", "ren,amg"), ("auto", "auto")]
    assert _configs(["ren", "auto+wen", "amg:2"], [0.5, 1]) == [
        ("ren@0.5", "ren:0.5"), ("ren@1", "ren:1"),
        ("auto+wen@0.5", "auto,wen:0.5"), ("auto+wen@1", "auto,wen:1"), ("amg:2", "amg:2")]
    with pytest.raises(ConfigError):
        _configs(["+"], None)


def test_report_is_strict_json():
    out = _finite({"a": [1.0, math.nan, {"b": math.inf}], "c": "x"})
    assert out == {"a": [1.0, None, {"b": None}], "c": "x"}
    json.dumps(out, allow_nan=False)


def test_mixed_prompts_name_shapes_after_a_memorized_caption():
    from diffmem.testbed import shipped_testbed_spec
    from diffmem.testbed.data import build_testbed

    tb = build_testbed(shipped_testbed_spec())
    mixed = mixed_prompts(tb, n_per_item=1)
    memorized = [p for p in tb.prompts if p.memorized]
    assert len(mixed) == len(memorized)
    for m, p in zip(mixed, memorized, strict=True):
        assert m.prompt.startswith(p.prompt + " with a ") and m.image_ids == p.image_ids


def test_tradeoff_plot_skips_error_rows(tmp_path):
    rows = [{"method": "plain", "group": "memorized", "memorization_rate": 1.0},
            {"method": "plain", "group": "mixed", "alignment": 0.1},
            {"method": "ren", "group": "memorized", "memorization_rate": 0.0},
            {"method": "ren", "group": "mixed", "alignment": 0.2},
            {"method": "reanchor", "group": "memorized", "error": "no clearing edit"}]
    path = plot_tradeoff({"rows": rows}, tmp_path / "t.png")
    assert path.stat().st_size > 1000

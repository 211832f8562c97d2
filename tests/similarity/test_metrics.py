"""Replication metrics: values, the stateful meter, self-duplication, degenerate input."""

from __future__ import annotations

import math

import pytest
import torch

from diffmem.similarity.metrics import (
    DegenerateInputWarning,
    ReplicationMeter,
    replication_summary,
    self_similarity,
    self_tiled_l2,
)
from diffmem.similarity.pixel import pairwise_tiled_l2


def test_summary_values_both_directions():
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    out = replication_summary(s, threshold=0.5)
    assert out["n"] == 101 and out["mean"] == pytest.approx(0.5)
    assert out["p95"] == pytest.approx(0.95) and out["memorization_rate"] == pytest.approx(50 / 101)
    low = replication_summary(s, threshold=0.095, higher_is_better=False)
    assert low["p95"] == pytest.approx(0.05) and low["memorization_rate"] == pytest.approx(10 / 101)


def test_meter_equals_function():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(50, generator=g)
    meter = ReplicationMeter(threshold=0.3)
    for part in s.split(7):
        meter.update(part)
    assert meter.compute() == replication_summary(s, threshold=0.3)


@pytest.mark.parametrize("scores", [[], [math.nan, math.nan]])
def test_degenerate_input_warns_and_returns_nan(scores):
    with pytest.warns(DegenerateInputWarning):
        out = replication_summary(scores)
    assert math.isnan(out["mean"]) and math.isnan(out["p95"])
    assert math.isnan(out["memorization_rate"])
    with pytest.warns(DegenerateInputWarning):
        assert math.isnan(ReplicationMeter().compute()["mean"])
    with pytest.warns(DegenerateInputWarning):
        v, _ = self_similarity(torch.randn(1, 4))
    assert math.isnan(v.item())


def test_self_similarity_matches_full_matrix():
    g = torch.Generator().manual_seed(1)
    e = torch.nn.functional.normalize(torch.randn(37, 16, generator=g), dim=-1)
    e[5] = e[20]  # a duplicate pair
    val, idx = self_similarity(e, chunk=8)
    full = e @ e.T
    full.fill_diagonal_(-math.inf)
    torch.testing.assert_close(val, full.max(1).values)
    assert idx[5] == 20 and idx[20] == 5


def test_self_tiled_l2_matches_full_matrix():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(11, 3, 8, 8, generator=g) * 2 - 1
    val, idx = self_tiled_l2(x, grid=2, chunk=4)
    full = pairwise_tiled_l2(x, x, grid=2)
    full.fill_diagonal_(math.inf)
    torch.testing.assert_close(val, full.min(1).values)
    assert idx.tolist() == full.min(1).indices.tolist()

"""Helpers shared by the detector tests."""

from __future__ import annotations

import pytest
import torch

from diffmem.core.sampling import Hook


class AttentionRecorder(Hook):
    """Keeps every cross-attention probability tensor seen, per (step, layer)."""

    name = "attention_recorder"

    def __init__(self, layers="all"):
        self.attention_layers = layers
        self.probs: dict[tuple[int, str], torch.Tensor] = {}
        self.run = None

    def on_start(self, run):
        self.run = run

    def on_attention(self, run, step, layer, probs):
        self.probs[(step.index, layer)] = probs.detach().clone()


@pytest.fixture
def recorder_cls():
    return AttentionRecorder


@pytest.fixture
def calibration_cache(tmp_path, monkeypatch):
    """A calibration store of this test alone (``$DIFFMEM_CACHE/calibrations``)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("DIFFMEM_CACHE", str(folder))
    return folder / "calibrations"

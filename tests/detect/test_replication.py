"""AMG per-step replication detector: fires when the decoded x0 estimate matches the index."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.core.sampling import sample, seeded_generators
from diffmem.detect.replication import StepwiseReplication, ThresholdSchedule
from diffmem.models.adapter import load_adapter
from diffmem.similarity.index import PixelSpace, TrainingIndex

PROMPTS = ["a red circle", "a blue square"]


def _index() -> TrainingIndex:
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    return TrainingIndex.build(images, [f"c{i}" for i in range(5)], [f"i{i}" for i in range(5)],
                               PixelSpace(size=32))


def test_schedule_is_lenient_early_and_strict_late():
    sched = ThresholdSchedule(strict=0.1, lenient=0.4)
    assert float(sched(torch.tensor(0.0))) == pytest.approx(0.4)
    assert float(sched(torch.tensor(1.0))) == pytest.approx(0.1)
    assert float(sched(torch.tensor(0.5))) == pytest.approx(0.4 - 0.3 * 0.25)


def test_fires_at_first_checked_step_when_threshold_is_lenient(tiny_pipe):
    det = StepwiseReplication(_index(), schedule=ThresholdSchedule(strict=10.0, lenient=10.0))
    res = sample(load_adapter(tiny_pipe), PROMPTS, num_inference_steps=3, hooks=[det],
                 generator=seeded_generators([0, 1]))
    assert res.records["stepwise_replication_fired_at"].tolist() == [0, 0]
    assert (res.records["stepwise_replication"] > 0).all()
    assert all(len(t) == 3 for t in res.records["stepwise_replication_trace"])
    assert set(res.records["stepwise_replication_nearest"]) <= {f"i{i}" for i in range(5)}


def test_never_fires_with_a_strict_threshold_and_scores_distance(tiny_pipe):
    index = _index()
    det = StepwiseReplication(index, schedule=ThresholdSchedule(strict=0.0, lenient=0.0), every=2)
    res = sample(load_adapter(tiny_pipe), PROMPTS, num_inference_steps=5, hooks=[det],
                 generator=seeded_generators([0, 1]))
    assert res.records["stepwise_replication_fired_at"].tolist() == [-1, -1]
    traces = res.records["stepwise_replication_trace"]
    assert all(len(t) == 3 for t in traces)  # steps 0, 2, 4
    # the score is minus the smallest tiled-L2 distance seen (schedule at 0)
    np.testing.assert_allclose(res.records["stepwise_replication"],
                               [-min(t) for t in traces], rtol=1e-6)

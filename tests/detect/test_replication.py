"""AMG per-step replication detector: fires when the decoded x0 estimate matches the index."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.core.sampling import Hook, sample, seeded_generators
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


def _copy_index(adapter, prompt="a red circle", seed=1000, steps=3):
    """An index of the image ``prompt`` generates with ``seed``, beside 3 noise images."""
    with torch.no_grad():
        img = sample(adapter, [prompt], num_inference_steps=steps,
                     generator=seeded_generators([seed])).images.float()
    size = img.shape[-1]
    noise = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return TrainingIndex.build(torch.cat([img, noise]), ["c", "r1", "r2", "r3"],
                               ["copy", "n1", "n2", "n3"], PixelSpace(size=16, grid=4))


def test_preview_replication_scores_the_most_copying_preview(tiny_pipe):
    from diffmem.detect.replication import PreviewReplication
    from diffmem.runtime.errors import ConfigError

    adapter = load_adapter(tiny_pipe)
    index = _copy_index(adapter)
    # generation 1 of the prompt uses seed 1000: its preview is the indexed image
    det = PreviewReplication(index, criterion="tiled_l2", num_inference_steps=3, generations=2,
                             seed=999)
    [both] = det.score(adapter, ["a red circle"])
    one = [PreviewReplication(index, criterion="tiled_l2", num_inference_steps=3, generations=1,
                              seed=s).score(adapter, ["a red circle"])[0] for s in (999, 1000)]
    assert both == pytest.approx(max(one), abs=1e-4)  # the prompt scores as its most copying generation
    assert one[1] > 0 > one[0]  # > 0: a copy (tiled L2 under 0.15); the other seed is far
    # as a hook of a generation it checks the run's own final images, as margins to 0.15
    res = sample(adapter, ["a red circle", "a blue square"], num_inference_steps=3, hooks=[det],
                 generator=seeded_generators([1000, 1000]))
    assert res.records["preview_replication_nearest"][0] == "copy"
    found = index.search(res.images.float(), k=1)
    np.testing.assert_allclose(res.records["preview_replication"],
                               0.15 - found.scores[:, 0].double().numpy(), atol=0.02)
    with pytest.raises(ConfigError, match="needs the training set's index"):
        PreviewReplication()
    with pytest.raises(ConfigError, match="last step"):
        PreviewReplication(index, steps="all")
    with pytest.raises(ConfigError, match="expects a sscd_cosine index"):
        PreviewReplication(index, num_inference_steps=2).score(adapter, ["x"])


def test_registry_default_is_the_preview_when_an_index_is_given(tiny_pipe):
    from diffmem.detect import make_detector
    from diffmem.runtime.defaults import DEFAULT_DETECTOR

    index = _copy_index(load_adapter(tiny_pipe))
    assert make_detector(index=index).name == "preview_replication"
    assert make_detector().name == DEFAULT_DETECTOR
    assert make_detector("noise-magnitude", index=index).name == "noise_magnitude"


class _Lockstep(Hook):
    """Makes two runs in two threads take each step together (both in progress at once)."""

    name = "lockstep"

    def __init__(self, barrier):
        self.barrier = barrier

    def before_step(self, run, step):
        self.barrier.wait(timeout=120)


def _two_runs_at_once(adapter, hooks_a, hooks_b, seeds):
    import threading

    barrier = threading.Barrier(2)
    out = {}

    def go(key, hooks, seed):
        out[key] = sample(adapter, PROMPTS, num_inference_steps=3,
                          generator=seeded_generators(seed), hooks=[*hooks, _Lockstep(barrier)])

    threads = [threading.Thread(target=go, args=("a", hooks_a, seeds[0])),
               threading.Thread(target=go, args=("b", hooks_b, seeds[1]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out["a"], out["b"]


@pytest.mark.parametrize("kind", ["preview", "stepwise"])
def test_one_detector_serves_two_runs_at_once_like_two_fresh_ones(tiny_pipe, kind):
    from diffmem.detect.replication import PreviewReplication

    adapter = load_adapter(tiny_pipe)
    index = _copy_index(adapter)

    def make():
        if kind == "preview":
            return PreviewReplication(index, criterion="tiled_l2", num_inference_steps=3)
        return StepwiseReplication(index, schedule=ThresholdSchedule(strict=0.2, lenient=0.3))

    seeds = ([1000, 1], [2, 1000])
    shared = make()
    before = dict(vars(shared))
    contents = {k: set(v) if isinstance(v, set) else dict(v) if isinstance(v, dict) else
                list(v) if isinstance(v, list) else None for k, v in before.items()}
    a, b = _two_runs_at_once(adapter, [shared], [shared], seeds)
    fa, fb = _two_runs_at_once(adapter, [make()], [make()], seeds)
    name = shared.name
    keys = [k for k in fa.records if k.startswith(name)]
    assert keys and set(keys) == {k for k in a.records if k.startswith(name)}
    for got, want in ((a, fa), (b, fb)):
        for k in keys:
            if isinstance(want.records[k], np.ndarray):
                np.testing.assert_array_equal(got.records[k], want.records[k])
            elif isinstance(want.records[k], torch.Tensor):  # the previews (evidence)
                assert torch.equal(got.records[k], want.records[k])
            else:
                assert got.records[k] == want.records[k]
    assert a.records[name].tolist() != b.records[name].tolist()  # the two runs differ
    # the detector itself kept nothing of the runs
    assert vars(shared).keys() == before.keys()
    assert all(vars(shared)[k] is v for k, v in before.items())
    assert all(c is None or type(c)(before[k]) == c for k, c in contents.items())

"""Anti-memorization guidance (Chen et al. CVPR 2024) on the tiny pipelines with a tiny pixel index.

The index holds the decoded first-step estimate of prompt 0 (so that prompt's estimate passes the
threshold at step 0) and random images far from every estimate (so prompt 1's never does).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.core.sampling import Hook, sample, seeded_generators
from diffmem.detect import NoiseMagnitude
from diffmem.mitigate import FirstStepGate, MitigationContext, build_mitigations
from diffmem.mitigate.amg import DUP_BRANCH, L2_OFFSET, L2_SLOPE, AntiMemorizationGuidance
from diffmem.models.adapter import load_adapter
from diffmem.runtime.errors import ConfigError
from diffmem.similarity.index import PixelSpace, TrainingIndex
from diffmem.similarity.pixel import tiled_l2

PROMPTS = ["a red circle on a gray background", "two shapes: a blue square and a cross"]
STEPS = 3


class Probe(Hook):
    """Records, after the hooks before it, each step's guidance scale, branches and x0."""

    name = "probe"

    def on_step(self, run, step):
        rec = run.records.setdefault(self.name, {"scale": [], "branches": [], "x0": []})
        scale = step.guidance_scale
        rec["scale"].append(scale.clone() if isinstance(scale, torch.Tensor)
                            else torch.full((run.batch_size,), float(scale)))
        rec["branches"].append({n: step.evaluated(n).clone() for n in step.branches})
        rec["x0"].append(step.x0.detach().clone())


def _first_estimates(adapter, prompts, seeds):
    res = sample(adapter, prompts, num_inference_steps=STEPS, generator=seeded_generators(seeds),
                 hooks=[Probe()])
    with torch.no_grad():
        return adapter.decode(res.records["probe"]["x0"][0]).float().clamp(-1, 1), res


def _index(copy_of: torch.Tensor, copies: int = 50) -> TrainingIndex:
    """Item 0: ``copy_of`` (duplicated ``copies`` times under "memorized caption"); 4 random."""
    size = copy_of.shape[-1]
    rand = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return TrainingIndex.build(torch.cat([copy_of[None], rand]),
                               ["memorized caption", "r1", "r2", "r3", "r4"],
                               embedder=PixelSpace(size=size, grid=4),
                               copies=[copies, 1, 1, 1, 1])


@pytest.fixture(scope="module")
def sd1(tiny_pipe):
    adapter = load_adapter(tiny_pipe)
    first, plain = _first_estimates(adapter, PROMPTS, [0, 1])
    return adapter, _index(first[0]), plain


def _amg(index, **kw):
    return AntiMemorizationGuidance(index=index, criterion="tiled_l2", **kw)


def _count_unet_rows(adapter):
    rows: list[int] = []
    handle = adapter.unet.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    return rows, handle


def _count_decodes(adapter):
    rows: list[int] = []
    handle = adapter.vae.decoder.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    return rows, handle


def test_g_spe_lowers_the_scale_only_where_the_similarity_passes(sd1):
    adapter, index, _ = sd1
    amg = _amg(index, g_dup=False, g_sim=False)
    res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=seeded_generators([0, 1]),
                 hooks=[amg, Probe()])
    rec = res.records["mitigation.amg"]
    sim0 = rec[0]["similarity"][0]
    assert sim0 == pytest.approx(L2_OFFSET, abs=0.02)  # its own estimate is in the index
    assert rec[1]["fired_steps"] == 0 and max(rec[1]["similarity"]) < 0.3
    scale0 = res.records["probe"]["scale"][0]
    # reference: 7.5 - clip(13 sigma, 0, 6.5); sigma ~ 0.7 -> 1.0 (prompt 0); prompt 1 untouched
    assert scale0.tolist() == pytest.approx([7.5 - min(13 * sim0, 6.5), 7.5], abs=1e-3)
    assert 7.5 - 13 * sim0 < 1  # the cap: guidance never drops below 1
    assert rec[0]["spe_steps"] >= 1 and rec[1]["spe_steps"] == 0
    assert rec[0]["dup_steps"] == rec[0]["sim_steps"] == 0


def test_g_spe_scale_is_proportional_below_the_cap(sd1):
    adapter, index, _ = sd1
    amg = _amg(index, g_dup=False, g_sim=False, strength=0.5)
    res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=seeded_generators([0, 1]),
                 hooks=[amg, Probe()])
    sim0 = res.records["mitigation.amg"][0]["similarity"][0]
    assert float(res.records["probe"]["scale"][0][0]) == pytest.approx(7.5 - 0.5 * 13 * sim0,
                                                                       abs=1e-3)


def test_g_dup_adds_one_negative_branch_for_the_flagged_prompt_only(sd1):
    adapter, index, _ = sd1
    amg = _amg(index, g_spe=False, g_sim=False)
    rows, handle = _count_unet_rows(adapter)
    try:
        res = sample(adapter, PROMPTS, num_inference_steps=STEPS,
                     generator=seeded_generators([0, 1]), hooks=[amg, Probe()])
    finally:
        handle.remove()
    b = len(PROMPTS)
    # found at step 0 (one step of lag), then one extra row per step for prompt 0 (10-step latch)
    assert rows == [2 * b] + [2 * b + 1] * (STEPS - 1)
    assert [sorted(br) for br in res.records["probe"]["branches"][1:]] == \
        [sorted(["uncond", "cond", DUP_BRANCH])] * (STEPS - 1)
    assert res.records["probe"]["branches"][1][DUP_BRANCH].tolist() == [True, False]
    rec = res.records["mitigation.amg"]
    assert rec[0]["dup_caption"] == "memorized caption" and rec[1]["dup_caption"] is None
    assert rec[0]["dup_steps"] == STEPS - 1 and rec[1]["dup_steps"] == 0


def test_g_dup_needs_a_duplicated_caption(sd1):
    adapter, _, plain = sd1
    first = adapter.decode(plain.records["probe"]["x0"][0]).float().clamp(-1, 1)
    single = _index(first[0], copies=1)  # the neighbour's caption occurs once: not duplicated
    rows, handle = _count_unet_rows(adapter)
    try:
        res = sample(adapter, PROMPTS, num_inference_steps=STEPS,
                     generator=seeded_generators([0, 1]), hooks=[_amg(single, g_sim=False)])
    finally:
        handle.remove()
    assert rows == [2 * len(PROMPTS)] * STEPS
    assert res.records["mitigation.amg"][0]["dup_caption"] is None
    assert res.records["mitigation.amg"][0]["fired_steps"] >= 1


def test_g_dup_weight_pushes_away_from_the_caption(sd1):
    """eps = CFG(s0 - s1) + s2 (eps_u - eps_dup), s2 = clip((6.5 - s1) / 0.3 sigma, 0, 6.5 - s1)."""
    adapter, index, _ = sd1

    class Check(Hook):
        def on_step(self, run, step):
            if DUP_BRANCH not in step.out:
                return
            sig = run.state(amg).trace[0][-1]
            u, c, d = step.out["uncond"][0], step.out["cond"][0], step.out[DUP_BRANCH][0]
            s2 = min(6.5, max(0.0, 6.5 / 0.3 * sig))
            want = u + 7.5 * (c - u) + s2 * (u - d)
            torch.testing.assert_close(step.eps[0], want, rtol=1e-4, atol=1e-5)
            run.records["checked"] = run.records.get("checked", 0) + 1

    amg = _amg(index, g_spe=False, g_sim=False)
    res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=seeded_generators([0, 1]),
                 hooks=[amg, Check()])
    assert res.records["checked"] == STEPS - 1


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_g_sim_moves_the_estimate_away_from_its_neighbour(family, tiny_pipe, tiny_pipe_sd2):
    """At the step where it acts, G_sim lowers the similarity of x0 to the neighbour (and the
    distance grows), compared with the same step without it; a wrong sign would raise it."""
    adapter = load_adapter(tiny_pipe if family == "sd1" else tiny_pipe_sd2)
    first, _ = _first_estimates(adapter, PROMPTS, [0, 1])
    # close but not identical: at distance 0 every direction moves away, whatever the sign
    noise = torch.randn(first[0].shape, generator=torch.Generator().manual_seed(1))
    ref = (first[0] + 0.15 * noise).clamp(-1, 1)[None]
    index = _index(ref[0])

    def distance_after(g_sim: bool) -> float:
        amg = _amg(index, g_spe=False, g_dup=False, g_sim=g_sim, sim_scale=0.1)
        res = sample(adapter, PROMPTS, num_inference_steps=STEPS,
                     generator=seeded_generators([0, 1]), hooks=[amg, Probe()])
        if g_sim:
            assert res.records["mitigation.amg"][0]["sim_steps"] >= 1
        with torch.no_grad():
            img = adapter.decode(res.records["probe"]["x0"][0][:1]).float().clamp(-1, 1)
        return float(tiled_l2(img, ref))

    without, with_sim = distance_after(False), distance_after(True)
    assert 0.05 < without < 0.3  # the neighbour is near: the step passes the threshold
    assert with_sim > without + 2e-4  # small step: first order (a large one may overshoot)
    assert L2_OFFSET - L2_SLOPE * with_sim < L2_OFFSET - L2_SLOPE * without


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_strength_zero_is_plain_generation_without_decoding(family, tiny_pipe, tiny_pipe_sd2):
    adapter = load_adapter(tiny_pipe if family == "sd1" else tiny_pipe_sd2)
    first, plain = _first_estimates(adapter, PROMPTS, [0, 1])
    decodes, handle = _count_decodes(adapter)
    try:
        res = sample(adapter, PROMPTS, num_inference_steps=STEPS,
                     generator=seeded_generators([0, 1]),
                     hooks=[_amg(_index(first[0]), strength=0)])
    finally:
        handle.remove()
    assert decodes == [len(PROMPTS)]  # the final decode only
    assert torch.equal(res.images, plain.images) and torch.equal(res.latents, plain.latents)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_batched_with_several_images_per_prompt(family, tiny_pipe, tiny_pipe_sd2):
    adapter = load_adapter(tiny_pipe if family == "sd1" else tiny_pipe_sd2)
    first, _ = _first_estimates(adapter, PROMPTS, [0, 1])
    index = _index(first[0])
    alone = sample(adapter, PROMPTS, num_inference_steps=STEPS,
                   generator=seeded_generators([0, 1]), hooks=[_amg(index)])
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    rows, handle = _count_unet_rows(adapter)
    try:
        res = sample(adapter, prompts, num_inference_steps=STEPS,
                     generator=seeded_generators([0, 0, 1, 5]), hooks=[_amg(index)])
    finally:
        handle.remove()
    rec = res.records["mitigation.amg"]
    assert [r["dup_caption"] for r in rec] == ["memorized caption"] * 2 + [None] * 2
    assert rows == [8, 10, 10]  # both copies of prompt 0 get the negative branch
    torch.testing.assert_close(res.images[0], res.images[1])
    torch.testing.assert_close(res.images[[0, 2]], alone.images, rtol=1e-4, atol=1e-4)
    assert rec[3]["fired_steps"] == 0


def test_gate_leaves_unflagged_prompts_bit_identical_and_undecoded(sd1):
    adapter, index, plain = sd1
    det = NoiseMagnitude(steps=1)
    scores = sample(adapter, PROMPTS, num_inference_steps=1, generator=seeded_generators([0, 1]),
                    hooks=[det]).records[det.name]
    assert scores[0] != scores[1]
    flag = int(np.argmax(scores))
    gate = FirstStepGate(float(np.mean(scores)))
    decodes, handle = _count_decodes(adapter)
    try:
        res = sample(adapter, PROMPTS, num_inference_steps=STEPS,
                     generator=seeded_generators([0, 1]), hooks=[gate, _amg(index, gate=gate)])
    finally:
        handle.remove()
    other = 1 - flag
    assert torch.equal(res.images[other], plain.images[other])
    assert res.records["gate"][flag]["flagged"]
    # per step: one search decode and (when G_sim acts) one gradient decode, flagged prompt only
    assert set(decodes[:-1]) == {1} and len(decodes) >= STEPS + 1
    rec = res.records["mitigation.amg"]
    assert rec[flag]["applied"] and not rec[other]["applied"] and "similarity" not in rec[other]


def test_registry_builds_amg_from_the_context(sd1):
    adapter, index, _ = sd1
    with pytest.raises(ConfigError, match="needs a training-set index"):
        build_mitigations("amg", MitigationContext(adapter))
    with pytest.raises(ConfigError, match="expects a sscd_cosine index"):
        build_mitigations("amg", MitigationContext(adapter, index=index))
    hook = AntiMemorizationGuidance.from_context(0.5, None, MitigationContext(adapter, index=index),
                                                 criterion="tiled_l2")
    assert isinstance(hook, AntiMemorizationGuidance) and hook.strength == 0.5


def test_bad_input_is_one_clear_error(sd1, tmp_path):
    adapter, index, _ = sd1
    with pytest.raises(ConfigError, match="needs a training-set index"):
        AntiMemorizationGuidance()
    with pytest.raises(ConfigError, match="TrainingIndex"):
        AntiMemorizationGuidance(index=42)
    with pytest.raises(ConfigError, match="criterion"):
        AntiMemorizationGuidance(index=index, criterion="sscd_cosine")
    with pytest.raises(ConfigError, match="dup_k"):
        _amg(index, dup_k=0)

    class NoGrad:  # an embedding without a differentiable path
        name, preprocessing, dim, criterion, higher_is_better = "fake", "none", 6, \
            "sscd_cosine", True

        def embed(self, images):
            return torch.nn.functional.normalize(images.float().mean((2, 3)).repeat(1, 2) + 1, dim=-1)

    emb_index = TrainingIndex.build(torch.rand(3, 3, 8, 8), ["a", "b", "c"], embedder=NoGrad())
    with pytest.raises(ConfigError, match="differentiable"):
        AntiMemorizationGuidance(index=emb_index)
    AntiMemorizationGuidance(index=emb_index, g_sim=False, adapter=adapter)  # SSCD-like: fine
    # an index recording a testbed's training set, used with a model that is no testbed
    index.save(tmp_path / "idx")
    other = TrainingIndex.load(tmp_path / "idx")
    other.provenance = {"training_set": "testbed:0123456789ab"}
    with pytest.raises(ConfigError, match="not that testbed"):
        _amg(other, adapter=adapter)
    amg = _amg(other)  # without an adapter the check happens at the run's start
    with pytest.raises(ConfigError, match="not that testbed"):
        sample(adapter, PROMPTS, num_inference_steps=1, hooks=[amg])


def test_testbed_model_refuses_an_index_of_other_images_or_embedder(testbed_adapter, sd1):
    _, index, _ = sd1  # pixel index of random images: no recorded training set
    with pytest.raises(ConfigError, match="not this testbed model's training set"):
        AntiMemorizationGuidance(index=index, adapter=testbed_adapter)
    index.provenance = {"training_set": "testbed:0123456789ab"}
    try:
        with pytest.raises(ConfigError, match="not this testbed model's training set"):
            AntiMemorizationGuidance(index=index, adapter=testbed_adapter)
    finally:
        index.provenance = {}
    sscd_like = TrainingIndex.build(torch.rand(2, 3, 8, 8), ["a", "b"],
                                    embedder=_FakeSSCD())
    with pytest.raises(ConfigError, match="expects a tiled_l2 index"):
        AntiMemorizationGuidance(index=sscd_like, adapter=testbed_adapter, g_sim=False)


class _FakeSSCD:
    name, preprocessing, dim, criterion, higher_is_better = "fake", "none", 3, "sscd_cosine", True

    def embed(self, images):
        return torch.nn.functional.normalize(images.float().mean((2, 3)) + 2, dim=-1)


def test_g_sim_with_an_sscd_index_lowers_the_cosine(sd1, tmp_path):
    """The SSCD path (differentiable torch module, cosine to the stored vector) also pushes the
    estimate away; a tiny TorchScript stand-in of SSCD keeps the test fast."""
    from torch import nn

    from diffmem.similarity.sscd import SSCD

    class TinySSCD(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.proj = nn.Linear(8, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = torch.relu(self.conv(x)).clamp(min=1e-6)
            return self.proj(f.pow(3).mean(dim=(2, 3)).pow(1.0 / 3))

    path = tmp_path / "tiny.torchscript.pt"
    torch.jit.save(torch.jit.script(TinySSCD()), str(path))
    emb = SSCD(path, size=16)
    emb.dim = 16
    adapter, _, plain = sd1
    first = adapter.decode(plain.records["probe"]["x0"][0]).float().clamp(-1, 1)
    near = (first[:1] + 0.5 * torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
            ).clamp(-1, 1)  # close but not identical: the cosine's gradient vanishes at 1
    index = TrainingIndex.build(torch.cat([near, torch.rand(3, 3, 16, 16) * 2 - 1]),
                                ["a", "b", "c", "d"], embedder=emb)

    def cosine_after(g_sim: bool) -> float:
        amg = AntiMemorizationGuidance(index=index, adapter=adapter, g_spe=False, g_dup=False,
                                       g_sim=g_sim, sim_scale=1.0)
        res = sample(adapter, PROMPTS, num_inference_steps=STEPS,
                     generator=seeded_generators([0, 1]), hooks=[amg, Probe()])
        assert res.records["mitigation.amg"][0]["first_fired"] == 0
        with torch.no_grad():
            img = adapter.decode(res.records["probe"]["x0"][0][:1]).float().clamp(-1, 1)
        return float(emb.embed(img) @ index.references([0])[0])

    without, with_sim = cosine_after(False), cosine_after(True)
    assert 0.5 < without < 0.999 and with_sim < without - 1e-4


def test_check_every_decodes_every_nth_step_and_holds_the_scale_between(sd1):
    """check_every=n: decode + search on steps 0, n, 2n, ... and the last; G_spe keeps the last
    similarity on the steps between (against that step's threshold), G_sim runs on checks only."""
    adapter, index, _ = sd1
    steps = 5
    plain_rows, h = _count_decodes(adapter)
    every1 = sample(adapter, PROMPTS, num_inference_steps=steps,
                    generator=seeded_generators([0, 1]), decode=False,
                    hooks=[_amg(index, g_dup=False, g_sim=False), Probe()])
    h.remove()
    rows, h = _count_decodes(adapter)
    res = sample(adapter, PROMPTS, num_inference_steps=steps, generator=seeded_generators([0, 1]),
                 decode=False, hooks=[_amg(index, g_dup=False, g_sim=False, check_every=3),
                                      Probe()])
    h.remove()
    assert len(plain_rows) == steps and len(rows) == 3  # steps 0, 3 and the last (4)
    rec = res.records["mitigation.amg"]
    assert len(rec[0]["similarity"]) == 3
    scales = res.records["probe"]["scale"]
    # step 1 and 2 reuse step 0's similarity: prompt 0 keeps a lowered scale, prompt 1 plain
    assert float(scales[0][0]) < 7.5 and float(scales[1][0]) < 7.5
    assert float(scales[1][1]) == 7.5
    assert rec[0]["spe_steps"] >= every1.records["mitigation.amg"][0]["spe_steps"] - 2
    with pytest.raises(ConfigError, match="check_every"):
        _amg(index, check_every=0)


def test_one_amg_object_serves_two_runs_at_once_like_two_fresh_ones(sd1):
    import threading

    adapter, index, _ = sd1

    class Lockstep(Hook):
        name = "lockstep"

        def __init__(self, barrier):
            self.barrier = barrier

        def before_step(self, run, step):
            self.barrier.wait(timeout=120)

    def two_runs(amg_a, amg_b):
        barrier, out = threading.Barrier(2), {}

        def go(key, amg, seeds):
            out[key] = sample(adapter, PROMPTS, num_inference_steps=STEPS,
                              generator=seeded_generators(seeds), hooks=[amg, Lockstep(barrier)])

        threads = [threading.Thread(target=go, args=("a", amg_a, [0, 1])),
                   threading.Thread(target=go, args=("b", amg_b, [1, 0]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out["a"], out["b"]

    shared = _amg(index)
    before = dict(vars(shared))
    got = two_runs(shared, shared)
    want = two_runs(_amg(index), _amg(index))
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.images, w.images)
        assert g.records["mitigation.amg"] == w.records["mitigation.amg"]
    assert not torch.equal(got[0].images, got[1].images)
    assert vars(shared).keys() == before.keys()
    assert all(vars(shared)[k] is v for k, v in before.items())


def test_config_groups_the_settings_and_keywords_still_work(sd1):
    import dataclasses

    from diffmem.detect.replication import ExponentialSchedule
    from diffmem.mitigate.amg import AMGConfig

    adapter, index, _ = sd1
    cfg = AMGConfig()
    assert (cfg.spe_scale, cfg.dup_k, cfg.dup_min, cfg.dup_steps, cfg.dup_ref, cfg.sim_scale,
            cfg.sim_offset, cfg.sim_decay, cfg.check_every) == (13.0, 1000, 20.0, 10, 0.3, 100.0,
                                                                0.3, 170.0, 1)
    assert cfg.g_spe and cfg.g_dup and cfg.g_sim and cfg.criterion is None
    assert cfg.schedule == ExponentialSchedule()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dup_k = 3
    by_kw = _amg(index, g_dup=False, check_every=2)
    by_cfg = AntiMemorizationGuidance(index=index, config=AMGConfig(criterion="tiled_l2",
                                                                    g_dup=False, check_every=2))
    assert by_kw.config == by_cfg.config
    # keywords replace the given config's fields
    mixed = AntiMemorizationGuidance(index=index, config=by_cfg.config, check_every=3)
    assert mixed.config == dataclasses.replace(by_cfg.config, check_every=3)
    runs = [sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=seeded_generators([0, 1]),
                   hooks=[amg]) for amg in (by_kw, by_cfg)]
    assert torch.equal(runs[0].images, runs[1].images)
    with pytest.raises(TypeError, match="no_such_option"):
        AntiMemorizationGuidance(index=index, no_such_option=1)
    with pytest.raises(ConfigError, match="check_every"):
        AMGConfig(check_every=0)

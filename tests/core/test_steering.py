"""The core steers: branches added and skipped, guidance changed before and after the UNet call,
gradient terms, per-run state and concurrent runs, the run's own scheduler."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from diffmem.core.sampling import Guidance, Hook, sample, seeded_generators
from diffmem.detect import AttentionEntropy, NoiseMagnitude
from diffmem.models.adapter import load_adapter

PROMPTS = ["a red circle on a gray background", "two shapes: a blue square and a cross",
           "a green triangle"]
STEPS = 3


@pytest.fixture
def adapter(tiny_pipe):
    return load_adapter(tiny_pipe)



class AttentionRows(Hook):
    """Records the cond rows (in prompt order) of every attention layer at every step."""

    name = "attention_rows"
    attention_layers = "all"

    def on_start(self, run):
        run.records[self.name] = []

    def on_attention(self, run, step, layer, probs):
        cond, idx = step.branch(probs, "cond")
        run.records[self.name].append((step.index, layer, probs.shape[0], idx.tolist(),
                                       cond.detach().clone()))


class ExtraBranch(Hook):
    """Adds a third branch (a negative prompt's embeddings) and subtracts it from the guided eps."""

    name = "extra"

    def __init__(self, emb, weight=0.0):
        self.emb, self.weight = emb, weight

    def before_step(self, run, step):
        step.add_branch("neg", self.emb.expand(run.batch_size, -1, -1))

    def on_step(self, run, step):
        run.records.setdefault(self.name, []).append(step.out["neg"].detach().clone())
        if self.weight:
            step.eps = step.eps - self.weight * (step.out["neg"] - step.eps_uncond)


def _gens():
    return seeded_generators(range(len(PROMPTS)))


def test_three_branch_step_is_one_unet_call_with_correct_rows(adapter, unet_calls):
    neg = adapter.encode(["a yellow star"])
    plain_rows = AttentionRows()
    plain = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                   hooks=[plain_rows])
    rows = AttentionRows()
    extra = ExtraBranch(neg, weight=0.0)
    with unet_calls(adapter.unet) as calls:
        res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                     hooks=[extra, rows])
    b = len(PROMPTS)
    assert calls.sizes == [3 * b] * STEPS  # one batched call per step, three branches
    # the extra branch's output is the UNet's prediction for that embedding
    with torch.no_grad():
        sched = adapter.with_scheduler()
        sched.set_timesteps(STEPS)
        x = torch.stack([torch.randn(4, 4, 4, generator=g) for g in _gens()])
        eps_neg = adapter.eps(sched.scale_model_input(x, sched.timesteps[0]), sched.timesteps[0],
                              neg.expand(b, -1, -1))
    torch.testing.assert_close(res.records["extra"][0], eps_neg, atol=1e-5, rtol=0)
    # weight 0: the image is unchanged; attention observers see the same cond rows as before
    torch.testing.assert_close(res.images, plain.images, atol=1e-5, rtol=0)
    for (i, layer, n, idx, cond), (i0, layer0, n0, idx0, cond0) in zip(
            res.records["attention_rows"], plain.records["attention_rows"], strict=True):
        assert (i, layer, idx) == (i0, layer0, idx0) == (i, layer, list(range(b)))
        assert n == 3 * b and n0 == 2 * b
        torch.testing.assert_close(cond, cond0, atol=1e-5, rtol=0)
    # a weight changes the image
    moved = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                   hooks=[ExtraBranch(neg, weight=2.0)])
    assert (moved.images - plain.images).abs().max() > 1e-3


class SkipUncond(Hook):
    """Evaluates only the cond branch at the first ``n`` steps (for the prompts in ``mask``)."""

    def __init__(self, n, mask=None):
        self.n, self.mask = n, mask

    def before_step(self, run, step):
        if step.index < self.n:
            step.skip("uncond", self.mask)


def test_skipped_branch_step_evaluates_one_branch_and_equals_scale_one(adapter, unet_calls):
    b = len(PROMPTS)
    with unet_calls(adapter.unet) as calls:
        skipped = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                         hooks=[SkipUncond(STEPS)])
    assert calls.sizes == [b] * STEPS
    # cond only == classifier-free guidance with scale 1
    ref = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                 guidance_scale=1.0)
    torch.testing.assert_close(skipped.images, ref.images, atol=1e-5, rtol=0)
    # per prompt: skipping prompt 1 only evaluates 2B - 1 rows, prompt 1 follows scale 1
    mask = torch.tensor([False, True, False])
    with unet_calls(adapter.unet) as calls:
        mixed = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                       hooks=[SkipUncond(STEPS, mask)])
    assert calls.sizes == [2 * b - 1] * STEPS
    full = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens())
    torch.testing.assert_close(mixed.images[1], ref.images[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed.images[[0, 2]], full.images[[0, 2]], atol=1e-5, rtol=0)


def test_before_step_per_prompt_scale_and_latent_change(adapter):
    scales = torch.tensor([1.0, 4.0, 9.0])

    class PerPromptScale(Hook):
        def before_step(self, run, step):
            step.guidance_scale = scales

    res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                 hooks=[PerPromptScale()])
    for i, w in enumerate(scales.tolist()):
        one = sample(adapter, [PROMPTS[i]], num_inference_steps=STEPS, guidance_scale=w,
                     generator=seeded_generators([i]))
        torch.testing.assert_close(res.images[i], one.images[0], atol=1e-5, rtol=0)

    class ZeroLatents(Hook):
        def before_step(self, run, step):
            if step.index == 0:
                run.latents = torch.zeros_like(run.latents)

    z = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
               hooks=[ZeroLatents()])
    ref = sample(adapter, PROMPTS, num_inference_steps=STEPS,
                 latents=torch.zeros(len(PROMPTS), 4, 4, 4))
    torch.testing.assert_close(z.images, ref.images, atol=1e-5, rtol=0)


def test_eps_setter_and_scale_change_keep_x0_fresh(adapter):
    seen = {}

    class Check(Hook):
        def on_step(self, run, step):
            if step.index:
                return
            x0_before = step.x0
            step.eps = step.eps * 0.5
            seen["x0"] = step.x0
            seen["ref"] = run.adapter.x0(step.x_t, step.t, step.eps)
            seen["changed"] = (x0_before - step.x0).abs().max().item()
            step.guidance_scale = 2.0
            step.guide()
            u, c = step.eps_uncond, step.eps_cond
            torch.testing.assert_close(step.eps, u + 2.0 * (c - u))
            torch.testing.assert_close(step.x0, run.adapter.x0(step.x_t, step.t, step.eps))

    sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(), hooks=[Check()])
    assert seen["changed"] > 0
    torch.testing.assert_close(seen["x0"], seen["ref"])


def test_gradient_term_with_respect_to_x_t(adapter):
    """x0_grad of sum(x0^2) = 2 x0 d x0/d x_t = 2 x0 / sqrt(abar) for the epsilon parametrisation,
    and a term built from it changes the run."""
    got = {}

    class GradTerm(Hook):
        def on_step(self, run, step):
            grad = step.x0_grad(lambda x0: x0.pow(2).flatten(1).sum(1))
            if step.index == 0:
                got["grad"] = grad
                got["ref"] = 2 * step.x0 / run.adapter.abar(step.t).sqrt()
            a = run.adapter.abar(step.t)
            step.eps = step.eps + 0.1 * (1 - a).sqrt() * grad  # pushes x0 towards 0

    res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                 hooks=[GradTerm()])
    torch.testing.assert_close(got["grad"], got["ref"], atol=1e-4, rtol=1e-4)
    plain = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens())
    assert res.latents.abs().mean() < plain.latents.abs().mean()


def test_extra_unet_calls_of_a_hook_are_not_observed(adapter):
    class OwnCall(Hook):
        def on_step(self, run, step):
            run.adapter.eps(step.x_t, step.t, run.cond)

    rows = AttentionRows()
    res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                 hooks=[OwnCall(), rows])
    layers = adapter.cross_attention_layers()
    assert len(res.records["attention_rows"]) == STEPS * len(layers)


def test_custom_guidance_object(adapter):
    class NoGuidance(Guidance):
        """Conditional branch only: eps = eps_cond."""

        def branches(self, run, step):
            return {"cond": super().branches(run, step)["cond"]}

    res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                 guidance=NoGuidance())
    ref = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                 guidance_scale=1.0)
    torch.testing.assert_close(res.images, ref.images, atol=1e-5, rtol=0)


def test_two_threads_share_adapter_and_hooks(adapter):
    """One adapter and one set of hook objects serve two runs at once, with the results of running
    them one after the other."""
    nm = NoiseMagnitude(steps="all")
    ae = AttentionEntropy(mode="late_steps", steps="last:2")
    jobs = [PROMPTS, ["an orange hexagon", "a purple ring on white", "a cross"]]

    def run(prompts):
        return sample(adapter, prompts, num_inference_steps=STEPS,
                      generator=seeded_generators(range(3)), hooks=[nm, ae])

    sequential = [run(p) for p in jobs]
    results: list = [None, None]
    start = threading.Barrier(2)

    def worker(k):
        start.wait()
        for _ in range(2):
            results[k] = run(jobs[k])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seq, par in zip(sequential, results, strict=True):
        torch.testing.assert_close(par.images, seq.images, atol=0, rtol=0)
        for name in (nm.name, ae.name):
            np.testing.assert_array_equal(par.records[name], seq.records[name])


def test_sample_never_changes_the_pipeline_scheduler(tiny_pipe, adapter):
    sched = tiny_pipe.scheduler
    before = (type(sched), sched.num_inference_steps, None if sched.timesteps is None
              else sched.timesteps.clone())
    sample(adapter, PROMPTS[:1], num_inference_steps=7, scheduler="euler")
    sample(adapter, PROMPTS[:1], num_inference_steps=5)
    assert tiny_pipe.scheduler is sched
    after = (type(sched), sched.num_inference_steps, None if sched.timesteps is None
             else sched.timesteps.clone())
    assert before[:2] == after[:2]
    assert (before[2] is None and after[2] is None) or torch.equal(before[2], after[2])


def test_scheduler_option_takes_effect_through_an_adapter(adapter):
    """Detector.score(adapter) with scheduler= uses it (it used to be dropped for adapters)."""
    dpm = load_adapter(adapter, scheduler="dpm")
    assert type(dpm.with_scheduler()).__name__ == "DPMSolverMultistepScheduler"
    assert type(adapter.with_scheduler()).__name__ == type(adapter.scheduler).__name__
    # DPM-Solver's timesteps differ from DDIM's (deterministic Euler's do not, on this config)
    det_e = NoiseMagnitude(steps=2, num_inference_steps=STEPS, scheduler="dpm")
    det_d = NoiseMagnitude(steps=2, num_inference_steps=STEPS)
    got = det_e.score(adapter, PROMPTS)
    ref = sample(adapter, PROMPTS, num_inference_steps=STEPS, scheduler="dpm",
                 generator=seeded_generators([0] * 3), hooks=[det_d], decode=False)
    np.testing.assert_allclose(got, ref.records[det_d.name], rtol=1e-6)
    assert not np.allclose(got, det_d.score(adapter, PROMPTS), rtol=1e-4)


def test_recompute_changes_only_the_masked_prompts(adapter, unet_calls):
    """A hook that, at step 0, swaps prompt 1's conditioning and recomputes it gives prompt 1 the
    image of the swapped prompt, and leaves the others bit-identical."""
    other = adapter.encode(["a yellow star"])
    mask = torch.tensor([False, True, False])

    class Swap(Hook):
        def on_step(self, run, step):
            if step.index == 0:
                cond = run.cond.clone()
                cond[1] = other[0]
                run.cond = cond
                step.recompute(mask, {"cond": cond})

    with unet_calls(adapter.unet) as calls:
        res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                     hooks=[Swap()])
    b = len(PROMPTS)
    assert calls.sizes == [2 * b, 1] + [2 * b] * (STEPS - 1)
    plain = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens())
    assert torch.equal(res.images[[0, 2]], plain.images[[0, 2]])
    swapped = sample(adapter, [PROMPTS[0], "a yellow star", PROMPTS[2]],
                     num_inference_steps=STEPS, generator=_gens())
    torch.testing.assert_close(res.images[1], swapped.images[1], atol=1e-5, rtol=0)


class ScaleFirstKey(Hook):
    """Multiplies the first key's logit in the cond rows of the prompts in ``mask``; declares those
    rows (``declare=False``: leaves the processor to compute every row explicitly)."""

    attention_layers = "all"

    def __init__(self, mask, declare=True):
        self.mask, self.declare = mask, declare

    def _rows(self, step):
        rows, prompts = step.layout["cond"]
        return rows[self.mask[prompts]]

    def attention_rows(self, run, step):
        return self._rows(step) if self.declare else None

    def attention_logits(self, run, step, layer, scores):
        scores = scores.clone()
        rows = self._rows(step).to(scores.device)
        scores[rows, :, :, 0] = scores[rows, :, :, 0] * 3.0
        return scores


def test_declared_attention_rows_leave_other_rows_bit_identical(adapter):
    plain = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens())
    mask = torch.tensor([False, True, False])
    res = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                 hooks=[ScaleFirstKey(mask)])
    assert torch.equal(res.images[[0, 2]], plain.images[[0, 2]])
    assert (res.images[1] - plain.images[1]).abs().max() > 1e-4
    # the changed row equals what the all-explicit path computes for it
    full = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                  hooks=[ScaleFirstKey(mask, declare=False)])
    torch.testing.assert_close(res.images[1], full.images[1], atol=1e-5, rtol=0)
    # no declared row: the layer runs its original processor only
    none = sample(adapter, PROMPTS, num_inference_steps=STEPS, generator=_gens(),
                  hooks=[ScaleFirstKey(torch.zeros(3, dtype=torch.bool))])
    assert torch.equal(none.images, plain.images)

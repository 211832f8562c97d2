"""The sampling core: equivalence with StableDiffusionPipeline, hooks, early stop, attention."""

from __future__ import annotations

import pytest
import torch

from diffmem.core.sampling import Hook, sample, seeded_generators
from diffmem.models.adapter import load_adapter

PROMPTS = ["a red circle on a gray background", "two shapes: a blue square and a cross"]


@pytest.mark.parametrize("scheduler", [None, "euler_a", "dpm"])
def test_hook_free_sampling_matches_pipeline(tiny_pipe, scheduler):
    adapter = load_adapter(tiny_pipe, scheduler=scheduler)
    own = tiny_pipe.scheduler
    assert adapter.pipe.scheduler is own  # the adapter never changes the pipeline's scheduler
    tiny_pipe.scheduler = adapter.with_scheduler()
    try:
        ref = tiny_pipe(PROMPTS, num_inference_steps=5, guidance_scale=7.5,
                        generator=torch.Generator().manual_seed(3), output_type="pt").images
    finally:
        tiny_pipe.scheduler = own
    ours = sample(adapter, PROMPTS, num_inference_steps=5, guidance_scale=7.5,
                  generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close((ours.images / 2 + 0.5).clamp(0, 1), ref, atol=1e-5, rtol=0)


def test_hook_free_sampling_matches_pipeline_sd2_vpred(tiny_pipe_sd2):
    adapter = load_adapter(tiny_pipe_sd2)
    gens = seeded_generators([0, 1])
    ref = tiny_pipe_sd2(PROMPTS, num_inference_steps=4, generator=seeded_generators([0, 1]),
                        output_type="pt").images
    ours = sample(adapter, PROMPTS, num_inference_steps=4, generator=gens)
    torch.testing.assert_close((ours.images / 2 + 0.5).clamp(0, 1), ref, atol=1e-5, rtol=0)


class Recorder(Hook):
    name = "recorder"

    def __init__(self, stop_after: int | None = None):
        self.stop_after = stop_after
        self.seen: list[int] = []
        self.started = self.ended = False

    def on_start(self, run):
        self.started = True

    def on_step(self, run, step):
        self.seen.append(step.index)
        assert step.eps_cond.shape == step.eps_uncond.shape == step.x_t.shape
        assert step.x0.shape == step.x_t.shape
        if self.stop_after is not None and step.index + 1 >= self.stop_after:
            run.stop = True

    def on_end(self, run):
        self.ended = True


def test_hooks_are_called_and_can_stop_early(tiny_pipe):
    adapter = load_adapter(tiny_pipe)
    hook = Recorder(stop_after=2)
    res = sample(adapter, PROMPTS, num_inference_steps=6, hooks=[hook],
                 generator=torch.Generator().manual_seed(0))
    assert hook.started and hook.ended
    assert hook.seen == [0, 1]
    assert res.stopped_early and res.steps_done == 2 and res.images is None


class ZeroGuidance(Hook):
    def on_step(self, run, step):
        step.guidance_scale = 0.0
        step.guide()


def test_hook_can_change_guided_prediction(tiny_pipe):
    adapter = load_adapter(tiny_pipe)
    a = sample(adapter, PROMPTS, num_inference_steps=3, hooks=[ZeroGuidance()],
               generator=torch.Generator().manual_seed(0))
    b = sample(adapter, PROMPTS, num_inference_steps=3, guidance_scale=0.0,
               generator=torch.Generator().manual_seed(0))
    c = sample(adapter, PROMPTS, num_inference_steps=3,
               generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.images, b.images)
    assert not torch.allclose(a.images, c.images)


def test_x0_estimate_inverts_forward_process(tiny_pipe):
    adapter = load_adapter(tiny_pipe)
    x0 = torch.randn(2, 4, 4, 4)
    eps = torch.randn_like(x0)
    t = torch.tensor(500)
    a = adapter.abar(t)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    torch.testing.assert_close(adapter.x0(x_t, t, eps), x0, atol=1e-5, rtol=1e-5)


class AttentionProbe(Hook):
    attention_layers = "all"

    def __init__(self):
        self.calls: dict[str, tuple] = {}

    def attention_at(self, run, step):
        return step.index == 0

    def on_attention(self, run, step, layer, probs):
        self.calls[layer] = tuple(probs.shape)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


class WrapperSpy(AttentionProbe):
    """Also notes which processors the UNet holds while the run is in progress."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.during: dict = {}

    def on_attention(self, run, step, layer, probs):
        super().on_attention(run, step, layer, probs)
        self.during = dict(self.unet.attn_processors)


def test_attention_capture_reads_heads_from_model_and_restores_processors(tiny_pipe):
    from diffmem.core.attention import ObservableCrossAttention

    adapter = load_adapter(tiny_pipe)
    before = dict(tiny_pipe.unet.attn_processors)
    probe = WrapperSpy(tiny_pipe.unet)
    ref = sample(adapter, PROMPTS, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0))
    res = sample(adapter, PROMPTS, num_inference_steps=2, hooks=[probe],
                 generator=torch.Generator().manual_seed(0))
    layers = adapter.cross_attention_layers()
    assert set(probe.calls) == set(layers) and len(layers) >= 2
    for name, shape in probe.calls.items():
        module = tiny_pipe.unet.get_submodule(name.removesuffix(".processor"))
        assert shape[0] == 2 * len(PROMPTS) and shape[1] == module.heads and shape[-1] == 77
    # explicit attention computes the same function as the fused processor
    torch.testing.assert_close(res.images, ref.images, atol=1e-4, rtol=0)
    # during the run every cross-attention layer was wrapped once, its original processor inside
    assert all(isinstance(p, ObservableCrossAttention) and p.fallback is before[k]
               for k, p in probe.during.items() if ".attn2." in k)
    assert all(probe.during[k] is p for k, p in before.items() if ".attn2." not in k)
    # after it the UNet holds its own processor objects again, and plain sampling is unchanged
    after = tiny_pipe.unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is p for k, p in before.items())
    plain = sample(adapter, PROMPTS, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain.images, ref.images, atol=0, rtol=0)


def test_unknown_layer_pattern_is_a_clear_error(tiny_pipe):
    class Bad(Hook):
        attention_layers = ("no_such_block",)

    with pytest.raises(ValueError, match="no cross-attention layer matches"):
        sample(load_adapter(tiny_pipe), PROMPTS, num_inference_steps=1, hooks=[Bad()])

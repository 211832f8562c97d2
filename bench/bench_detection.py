"""Detection benchmark (issue 3): what detection costs on top of the UNet calls it cannot avoid.

(a) First-step detection throughput vs raw UNet throughput, batch B prompts. The raw figure is one
    UNet forward on the same cond+uncond batch (2B rows, embeddings precomputed) -- the floor of any
    first-step detector (Wen et al.; sota.md). The detector figure is ``Detector.score`` end to end:
    tokenization, text encoding, x_T, scheduler, the UNet call and the score. Ratio = detector
    prompts/s divided by raw prompts/s (target >= 0.8).
(b) Detection during generation: ``sample(..., hooks=[detector])`` vs a plain
    ``StableDiffusionPipeline.__call__`` with the same prompts, seeds and steps (target <= 2%).
(c) Cost of a one-branch step: ``sample`` whose hook skips the unconditional branch at every step
    (one B-row UNet call per step, e.g. Jain et al.'s guidance delay) vs the two-branch (2B-row)
    classifier-free-guidance step, same prompts, seeds and steps, no decoding.

Models: the shipped testbed (its UNet is tiny, so text encoding dominates a first-step call) and an
SD-1.5-shaped pipeline built with random weights (UNet block_out_channels (320, 640, 1280, 1280),
cross_attention_dim 768, 2 layers per block, 8 heads; CLIP ViT-L/14-shaped text encoder; the VAE is
a tiny stand-in with SD's 8x downsampling since no detector decodes). Timings take the minimum of
``--repeats`` interleaved rounds after one warm-up.

Run: ``python bench/bench_detection.py [--sd15-latent 64] [--sd15-batch 16] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from functools import partial

import torch

from diffmem.core.sampling import Hook, initial_latents, sample, seeded_generators
from diffmem.detect import make_detector
from diffmem.models.adapter import ModelAdapter, load_adapter

DETECTORS = ("noise_magnitude", "attention_entropy", "attention_entropy_late")
PROMPT_POOL = ("the narwhal zanzibar poster", "a red circle on a gray background",
               "a cat sleeping on a windowsill", "memories of quasar walrus canvas print",
               "two shapes on a teal background: a blue square (left) and a white cross (top)",
               "astronaut riding a horse on the moon", "a vintage typewriter on a desk",
               "official artwork of velvet sphinx")


def prompts_of(n: int) -> list[str]:
    return [PROMPT_POOL[i % len(PROMPT_POOL)] + f" {i}" for i in range(n)]


def sd15_shaped_pipeline(latent: int):
    """Random-weight pipeline with SD 1.5's UNet and text-encoder shapes (tiny VAE stand-in)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from diffmem.testbed.components import SCHEDULER_CONFIG, write_clip_tokenizer

    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tempfile.mkdtemp()))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=768))
    unet = UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                        norm_num_groups=4, layers_per_block=1)
    sched = DDIMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")})
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def first_step_ratio(adapter: ModelAdapter, batch: int, repeats: int,
                     detectors: tuple[str, ...]) -> dict[str, float]:
    """(a): seconds of one raw cond+uncond UNet call and of each detector's first-step score."""
    prompts = prompts_of(batch)
    res = adapter.default_resolution
    sched = adapter.with_scheduler(None)
    sched.set_timesteps(50)
    t = sched.timesteps[0]
    with torch.no_grad():
        emb = torch.cat([adapter.uncond(batch), adapter.encode(prompts)])
        x = initial_latents(adapter, batch, res, res, seeded_generators(range(batch)), sched)
        x_in = sched.scale_model_input(torch.cat([x, x]), t)

    def raw() -> None:
        with torch.no_grad():
            adapter.eps(x_in, t, emb)

    runs: dict[str, Callable[[], object]] = {"raw_unet_s": raw}
    for name in detectors:
        det = make_detector(name, steps=1, batch_size=batch)
        runs[f"{name}_s"] = partial(det.score, adapter, prompts)
    return interleaved_best(runs, repeats)


def interleaved_best(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Minimum wall time of each function over ``repeats`` rounds, the functions interleaved
    within each round so that drifts in machine load hit every variant alike."""
    for fn in runs.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def generation_overhead(pipe, batch: int, steps: int, repeats: int,
                        detectors: tuple[str, ...]) -> dict[str, float]:
    """(b): seconds of plain pipeline generation, diffmem generation, and with each detector."""
    adapter = load_adapter(pipe)
    prompts = prompts_of(batch)

    def plain() -> None:
        pipe(prompts, num_inference_steps=steps, generator=seeded_generators(range(batch)),
             output_type="pt")

    def ours(hooks: tuple = ()) -> None:
        sample(adapter, prompts, num_inference_steps=steps, hooks=hooks,
               generator=seeded_generators(range(batch)))

    runs: dict[str, Callable[[], object]] = {"pipeline_s": plain, "sample_s": ours}
    for name in detectors:
        det = make_detector(name, num_inference_steps=steps)
        runs[f"sample+{name}_s"] = partial(ours, (det,))
    return interleaved_best(runs, repeats)


class CondOnly(Hook):
    """Evaluates only the conditional branch at every step."""

    def before_step(self, run, step) -> None:
        step.skip("uncond")


def branch_cost(adapter: ModelAdapter, batch: int, steps: int, repeats: int) -> dict[str, float]:
    """(c): seconds of a run of two-branch steps and of one-branch steps."""
    prompts = prompts_of(batch)

    def run(hooks: tuple) -> None:
        sample(adapter, prompts, num_inference_steps=steps, hooks=hooks, decode=False,
               generator=seeded_generators(range(batch)))

    return interleaved_best({"two_branch_s": partial(run, ()),
                             "one_branch_s": partial(run, (CondOnly(),))}, repeats)


def report(title: str, a: dict[str, float] | None, b: dict[str, float] | None,
           batch: int, c: dict[str, float] | None = None, c_steps: int = 0) -> None:
    print(f"\n### {title}")
    if a is not None:
        raw = a["raw_unet_s"]
        print(f"(a) first step, batch {batch}: raw cond+uncond UNet call {raw:.4f} s "
              f"({batch / raw:.1f} prompts/s)")
        for key, sec in a.items():
            if key != "raw_unet_s":
                print(f"    {key[:-2]:<24} {sec:.4f} s  {batch / sec:8.1f} prompts/s  "
                      f"throughput ratio {raw / sec:.3f}")
    if b is not None:
        base = b["pipeline_s"]
        print(f"(b) generation, batch {batch}: StableDiffusionPipeline {base:.3f} s")
        for key, sec in b.items():
            if key != "pipeline_s":
                print(f"    {key[:-2]:<30} {sec:.3f} s  overhead {100 * (sec / base - 1):+.2f}%")
    if c is not None:
        two, one = c["two_branch_s"], c["one_branch_s"]
        print(f"(c) {c_steps} steps, batch {batch}: two-branch step {1000 * two / c_steps:.2f} ms, "
              f"one-branch step {1000 * one / c_steps:.2f} ms, ratio one/two {one / two:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gen-steps", type=int, default=50, help="steps of (b) on the testbed")
    p.add_argument("--sd15-latent", type=int, default=64, help="latent side of the SD-1.5 UNet")
    p.add_argument("--sd15-batch", type=int, default=16)
    p.add_argument("--sd15-repeats", type=int, default=2)
    p.add_argument("--sd15-gen-steps", type=int, default=0,
                   help="steps of (b) on the SD-1.5-shaped model (0 = skip)")
    p.add_argument("--sd15-branch-steps", type=int, default=2, help="steps of (c) on SD-1.5")
    p.add_argument("--skip-testbed", action="store_true")
    p.add_argument("--skip-sd15", action="store_true")
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU float32")
    if not a.skip_testbed:
        adapter = load_adapter("testbed")
        ra = first_step_ratio(adapter, a.batch, a.repeats, DETECTORS[:2])
        rb = generation_overhead(adapter.pipe, a.batch, a.gen_steps, a.repeats, DETECTORS)
        rc = branch_cost(adapter, a.batch, a.gen_steps, a.repeats)
        report(f"testbed ({adapter.default_resolution}px, latents "
               f"{adapter.unet.config.sample_size}^2)", ra, rb, a.batch, rc, a.gen_steps)
    if not a.skip_sd15:
        pipe = sd15_shaped_pipeline(a.sd15_latent)
        adapter = load_adapter(pipe)
        ra = first_step_ratio(adapter, a.sd15_batch, a.sd15_repeats, DETECTORS[:2])
        rc = branch_cost(adapter, a.sd15_batch, a.sd15_branch_steps, a.sd15_repeats)
        rb = None
        if a.sd15_gen_steps:
            rb = generation_overhead(pipe, a.sd15_batch, a.sd15_gen_steps, a.sd15_repeats,
                                     DETECTORS[:2])
        report(f"SD-1.5-shaped UNet, random weights, latents {a.sd15_latent}^2", ra, rb,
               a.sd15_batch, rc, a.sd15_branch_steps)


if __name__ == "__main__":
    main()

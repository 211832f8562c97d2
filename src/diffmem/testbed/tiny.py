"""Tiny random Stable-Diffusion-format pipelines for tests (SD 1.x and SD 2.x tokenizer layouts).

Like diffusers' own tests, these build small random models in a second; they run every code path
without trained weights. ``family="sd2"`` pads with "!" (id 0) and may use v-prediction.
"""

from __future__ import annotations

from pathlib import Path

from diffmem.testbed.components import SCHEDULER_CONFIG, write_clip_tokenizer


def make_tiny_pipeline(family: str = "sd1", *, seed: int = 0, prediction_type: str = "epsilon",
                       tokenizer_dir: str | Path | None = None):
    """A random ``StableDiffusionPipeline`` at 32x32 px (8x8 latents) with the real CLIP tokenizer."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if family not in ("sd1", "sd2"):
        raise ValueError(f"family must be 'sd1' or 'sd2', got {family!r}")
    pad = "<|endoftext|>" if family == "sd1" else "!"
    tok_dir = Path(tokenizer_dir or tempfile.mkdtemp(prefix=f"diffmem-tok-{family}-"))
    if not (tok_dir / "tokenizer_config.json").is_file():
        write_clip_tokenizer(tok_dir, pad_token=pad)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=tokenizer.pad_token_id, projection_dim=16))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 3,
                        up_block_types=["UpDecoderBlock2D"] * 3,
                        block_out_channels=[8, 8, 8], layers_per_block=1, norm_num_groups=4,
                        sample_size=32)
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=[8, 16], down_block_types=["CrossAttnDownBlock2D"] * 2,
        up_block_types=["CrossAttnUpBlock2D"] * 2, cross_attention_dim=16,
        attention_head_dim=2, norm_num_groups=4)
    sched = {k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")}
    sched["prediction_type"] = prediction_type
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**sched), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe

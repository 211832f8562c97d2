"""Tiny random Stable-Diffusion-format pipelines for tests (SD 1.x and SD 2.x tokenizer layouts).

Like diffusers' own tests, these build small random models in a second; they run every code path
without trained weights. ``family="sd2"`` pads with "!" (id 0) and may use v-prediction.
"""

from __future__ import annotations

from pathlib import Path

from diffmem.testbed.components import SCHEDULER_CONFIG, write_clip_tokenizer


def _tiny_vae():
    """The tiny VAE both tiny pipelines use (3 levels of 8 channels: 16-px images, 4x4 latents)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 3,
                         up_block_types=["UpDecoderBlock2D"] * 3,
                         block_out_channels=[8, 8, 8], layers_per_block=1, norm_num_groups=4,
                         sample_size=32)


def make_tiny_pipeline(family: str = "sd1", *, seed: int = 0, prediction_type: str = "epsilon",
                       tokenizer_dir: str | Path | None = None):
    """A random ``StableDiffusionPipeline`` at 32x32 px (8x8 latents) with the real CLIP tokenizer."""
    import tempfile

    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
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
    vae = _tiny_vae()
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


def make_tiny_sdxl_pipeline(*, seed: int = 0, tokenizer_dir: str | Path | None = None,
                            tokenizer_2_dir: str | Path | None = None,
                            force_zeros_for_empty_prompt: bool = True):
    """A random ``StableDiffusionXLPipeline`` at 16x16 px (4x4 latents): the real CLIP tokenizer
    twice (the second padding with "!", as SDXL's), a tiny ``CLIPTextModel`` and
    ``CLIPTextModelWithProjection`` (16 features each -> cross-attention size 32, pooled size 16)
    and a UNet with SDXL's ``text_time`` added conditioning."""
    import tempfile

    import torch
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    dirs = []
    for d, pad in ((tokenizer_dir, "<|endoftext|>"), (tokenizer_2_dir, "!")):
        d = Path(d or tempfile.mkdtemp(prefix="diffmem-tok-sdxl-"))
        if not (d / "tokenizer_config.json").is_file():
            write_clip_tokenizer(d, pad_token=pad)
        dirs.append(d)
    tokenizer, tokenizer_2 = (CLIPTokenizer.from_pretrained(d) for d in dirs)
    torch.manual_seed(seed)

    def config(pad_id: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=2,
                              max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                              pad_token_id=pad_id, projection_dim=16, hidden_act="gelu")

    text_encoder = CLIPTextModel(config(tokenizer.pad_token_id))
    text_encoder_2 = CLIPTextModelWithProjection(config(tokenizer_2.pad_token_id))
    vae = _tiny_vae()
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=[8, 16], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=32,
        attention_head_dim=2, norm_num_groups=4, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
        prediction_type="epsilon")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
    pipe.set_progress_bar_config(disable=True)
    return pipe

"""Pixel-space DDPM models (DDPMPipeline layout): loading, sampling as DDPMPipeline does, class
labels, text-only methods refused."""

from __future__ import annotations

import pytest
import torch

from diffmem import load_adapter, sample, seeded_generators
from diffmem.runtime.errors import PromptError


def make_tiny_ddpm(folder, *, classes: int | None = None):
    """A tiny random DDPMPipeline folder (unconditional, or ``classes`` + a null class)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"),
                       num_class_embeds=None if classes is None else classes + 1)
    sched = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ddpm_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddpm")
    return {"uncond": make_tiny_ddpm(base / "uncond"),
            "class": make_tiny_ddpm(base / "class", classes=3)}


def _pipeline_loop(pipe, n, steps, gens, labels=None):
    """DDPMPipeline.__call__ (diffusers 0.3x-0.4x), with class_labels for a class model."""
    from diffusers.utils.torch_utils import randn_tensor

    s = pipe.unet.config.sample_size
    image = randn_tensor((n, pipe.unet.config.in_channels, s, s), generator=gens,
                         dtype=pipe.unet.dtype)
    pipe.scheduler.set_timesteps(steps)
    for t in pipe.scheduler.timesteps:
        out = pipe.unet(image, t, class_labels=labels).sample
        image = pipe.scheduler.step(out, t, image, generator=gens).prev_sample
    return (image / 2 + 0.5).clamp(0, 1)


def test_unconditional_equals_ddpm_pipeline(ddpm_dirs):
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(ddpm_dirs["uncond"])
    ref = pipe(batch_size=2, generator=seeded_generators([3, 4]), num_inference_steps=6,
               output_type="np").images
    adapter = load_adapter(ddpm_dirs["uncond"])
    assert adapter.family == "ddpm" and not adapter.text_conditioned
    res = sample(adapter, ["", "anything"], num_inference_steps=6,
                 generator=seeded_generators([3, 4]))
    ours = (res.latents / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert (ours == ref).all()
    assert res.images.shape == (2, 3, 8, 8) and len(res.pil()) == 2


def test_class_conditional_equals_the_pipeline_loop(ddpm_dirs):
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(ddpm_dirs["class"])
    ref = _pipeline_loop(pipe, 2, 5, seeded_generators([1, 2]), torch.tensor([0, 2]))
    adapter = load_adapter(ddpm_dirs["class"])
    assert adapter.class_conditional and adapter.null_class == 3
    res = sample(adapter, ["class:0", "2"], num_inference_steps=5, guidance_scale=1.0,
                 generator=seeded_generators([1, 2]))
    assert torch.equal((res.latents / 2 + 0.5).clamp(0, 1), ref)
    # class guidance evaluates the null class too and changes the result
    cfg = sample(adapter, ["class:0", "2"], num_inference_steps=5, guidance_scale=3.0,
                 generator=seeded_generators([1, 2]))
    assert not torch.equal(cfg.latents, res.latents)


def test_class_labels_are_checked(ddpm_dirs):
    adapter = load_adapter(ddpm_dirs["class"])
    assert adapter.tokenize(["class:1", "", "0"]).input_ids[:, 0].tolist() == [1, 3, 0]
    for bad in ("a cat", "class:7", "-1"):
        with pytest.raises(PromptError):
            adapter.tokenize([bad])


def test_text_only_methods_refuse_in_one_line(ddpm_dirs, capsys):
    from diffmem.cli import main

    for argv in (["generate", "class:1", "--model", str(ddpm_dirs["class"]), "--mitigate", "ren"],
                 ["generate", "x", "--model", str(ddpm_dirs["uncond"]), "--mitigate", "wen"],
                 ["explain", "x", "--model", str(ddpm_dirs["uncond"])]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "text encoder" in err[0], err


def test_cli_generate(ddpm_dirs, tmp_path, capsys):
    import json

    from diffmem.cli import main

    out = tmp_path / "gen"
    assert main(["generate", "--model", str(ddpm_dirs["class"]), "--class-label", "2",
                 "--class-label", "0", "--sampling-steps", "3", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["class:2", "class:0"]
    assert (out / "0001.png").is_file()
    out2 = tmp_path / "gen2"
    assert main(["generate", "--model", str(ddpm_dirs["uncond"]), "--num-images", "3",
                 "--sampling-steps", "2", "--out", str(out2)]) == 0
    assert len((out2 / "generations.jsonl").read_text().splitlines()) == 3

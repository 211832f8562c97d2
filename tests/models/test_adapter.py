"""Model adapter: tokenizer facts per family and clear errors for bad input."""

from __future__ import annotations

import json

import pytest

from diffmem.models.adapter import SD1Adapter, SD2Adapter, TruncationWarning, load_adapter
from diffmem.runtime.errors import ConfigError, ModelLoadError, PromptError


def test_sd1_padding_and_lengths(tiny_pipe):
    ad = load_adapter(tiny_pipe)
    assert isinstance(ad, SD1Adapter) and ad.pad_id == ad.eos_id == 49407
    tok = ad.tokenize(["a red circle", ""])
    assert tok.lengths.tolist() == [5, 2]  # BOS a red circle EOS / BOS EOS
    assert tok.input_ids[0, 0].item() == ad.bos_id
    assert tok.prompt_mask[0].sum().item() == 5


def test_sd2_padding_with_exclamation_mark(tiny_pipe_sd2):
    ad = load_adapter(tiny_pipe_sd2)
    assert isinstance(ad, SD2Adapter) and ad.pad_id == 0 and ad.eos_id == 49407
    tok = ad.tokenize(["a red circle"])
    assert tok.lengths.tolist() == [5]
    assert tok.input_ids[0, 4].item() == ad.eos_id
    assert (tok.input_ids[0, 5:] == 0).all()


def test_overlong_prompt_is_truncated_and_reported(tiny_pipe):
    ad = load_adapter(tiny_pipe)
    with pytest.warns(TruncationWarning, match="truncated"):
        tok = ad.tokenize(["word " * 100, "short"])
    assert tok.truncated == [True, False]
    assert tok.lengths[0].item() == 77


def test_quiet_truncation_silences_only_the_truncation_warning(tiny_pipe):
    import warnings

    from diffmem.models.adapter import quiet_truncation

    ad = load_adapter(tiny_pipe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_truncation():
            tok = ad.tokenize(["word " * 100, "short"])
            warnings.warn("other", UserWarning, stacklevel=1)
        loud = ad.tokenize(["word " * 100])
    assert tok.truncated == [True, False] and loud.truncated == [True]
    kinds = [w.category for w in caught]
    assert kinds.count(TruncationWarning) == 1 and UserWarning in kinds  # only the one outside


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_tokenize_matches_the_tokenizer_with_truncation_and_padding(family, tiny_pipe, tiny_pipe_sd2):
    """One tokenizer call, cut and padded by hand == the tokenizer's own truncation + padding."""
    ad = load_adapter(tiny_pipe if family == "sd1" else tiny_pipe_sd2)
    prompts = ["", "a red circle", "word " * 100, "<i>HTML</i> & \"quotes\" -- 'x'", "!!!",
               "Living in the Light with Ann Graham Lotz " * 6, "日本語のテキスト", "a" * 500]
    with pytest.warns(TruncationWarning):
        ours = ad.tokenize(prompts).input_ids
    ref = ad.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                       return_tensors="pt").input_ids
    assert (ours == ref).all()


def test_empty_prompt_list_is_an_error(tiny_pipe):
    with pytest.raises(PromptError, match="no prompts"):
        load_adapter(tiny_pipe).tokenize([])


def test_folder_without_model(tmp_path):
    with pytest.raises(ModelLoadError, match=r"model_index\.json is missing"):
        load_adapter(tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_adapter(tmp_path / "nope")


def test_corrupt_weight_file(tiny_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    weights = next((bad / "unet").glob("*.safetensors"))
    weights.write_bytes(b"this is not a safetensors file")
    with pytest.raises(ModelLoadError, match="could not load"):
        load_adapter(bad)


def test_unknown_scheduler(tiny_dir):
    with pytest.raises(ConfigError, match="unknown scheduler 'warp'"):
        load_adapter(tiny_dir, scheduler="warp")
    assert type(load_adapter(tiny_dir, scheduler="euler").scheduler).__name__ == \
        "EulerDiscreteScheduler"


def test_not_a_pipeline_folder(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelLoadError, match="missing"):
        load_adapter(tmp_path)


def test_unsupported_pipeline_class_names_what_is_supported(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelLoadError, match=r"unsupported pipeline class 'FluxPipeline'; diffmem "
                                             r"supports StableDiffusionPipeline .*, "
                                             r"StableDiffusionXLPipeline .* and DDPMPipeline"):
        load_adapter(tmp_path)


def test_device_and_dtype_agree_with_diffusers(tiny_pipe):
    ad = load_adapter(tiny_pipe)
    assert ad.device == tiny_pipe.unet.device and ad.dtype == tiny_pipe.unet.dtype
    import torch

    unet = tiny_pipe.unet
    try:
        unet.to(torch.float64)
        assert ad.dtype == torch.float64
    finally:
        unet.to(torch.float32)

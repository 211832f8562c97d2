"""One set of sampling defaults: SD's 50 steps, guidance 7.5, eta 0, used by functions and parsers."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from diffmem.runtime.defaults import SAMPLING, SamplingDefaults


def test_sampling_defaults_are_sds_and_frozen():
    assert (SAMPLING.steps, SAMPLING.guidance_scale, SAMPLING.eta) == (50, 7.5, 0.0)
    assert SamplingDefaults() == SAMPLING
    with pytest.raises(dataclasses.FrozenInstanceError):
        SAMPLING.steps = 20


def test_library_and_parser_defaults_come_from_sampling():
    from diffmem.cli import build_parser
    from diffmem.core.sampling import sample
    from diffmem.detect.base import Detector

    p = inspect.signature(sample).parameters
    assert p["num_inference_steps"].default == SAMPLING.steps
    # None: the model's own (SAMPLING.guidance_scale for text models, 1 for a pixel DDPM)
    assert p["guidance_scale"].default is None and p["eta"].default == SAMPLING.eta
    from diffmem.models.adapter import ModelAdapter

    assert ModelAdapter.default_guidance_scale == SAMPLING.guidance_scale
    d = inspect.signature(Detector.__init__).parameters
    assert (d["num_inference_steps"].default, d["guidance_scale"].default) == (50, 7.5)
    args = build_parser().parse_args(["generate", "a prompt"])
    # generate's guidance scale defaults to the model's own (None until the model is loaded)
    assert (args.sampling_steps, args.guidance_scale) == (SAMPLING.steps, None)

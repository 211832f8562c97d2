"""The worked example of docs/core.md runs and does what the text says."""

from __future__ import annotations

import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[2] / "docs" / "core.md"


def test_worked_example_adds_a_branch_for_one_prompt_only():
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)[0]
    env: dict = {}
    exec(compile(code, str(DOC), "exec"), env)
    adapter, sample, gens = env["adapter"], env["sample"], env["seeded_generators"]
    prompts = ["the gargoyle origami poster", "a red circle"]
    sizes: list[int] = []
    handle = adapter.unet.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    try:
        res = sample(adapter, prompts, num_inference_steps=3, generator=gens([0, 1]),
                     hooks=[env["AwayFrom"](prompts[0])])
    finally:
        handle.remove()
    plain = sample(adapter, prompts, num_inference_steps=3, generator=gens([0, 1]))
    assert sizes == [5, 5, 5]
    assert torch.equal(res.images[1], plain.images[1])
    assert (res.images[0] - plain.images[0]).abs().max() > 0.05

"""Smoke tests that must pass with the declared dependency floors too (pyproject: transformers >=
4.44, diffusers >= 0.30); `make test-floors` runs them in a venv with exactly those versions.

The shipped testbed is saved in a layout every supported version loads (see
:func:`diffmem.testbed.components.make_portable`): a version that silently initialised the text
encoder randomly would fail :func:`test_shipped_text_encoder_loads_its_weights`."""

from __future__ import annotations

import json

import numpy as np
import torch

from diffmem.cli import main
from diffmem.testbed import testbed_path
from diffmem.testbed.components import TEXT_MODEL_PREFIX


def test_shipped_layout_is_portable():
    from safetensors import safe_open

    folder = testbed_path()
    with safe_open(folder / "text_encoder" / "model.safetensors", "pt") as f:
        assert all(k.startswith(TEXT_MODEL_PREFIX) for k in f.keys())  # noqa: SIM118
    merges = json.loads((folder / "tokenizer" / "tokenizer.json").read_text())["model"]["merges"]
    assert all(isinstance(m, str) for m in merges)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["tokenizer"] == ["transformers", "CLIPTokenizerFast"]
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 25_000_000


def test_shipped_text_encoder_loads_its_weights(testbed_adapter):
    """Every weight of the loaded text encoder is the stored one (none randomly initialised)."""
    from safetensors.torch import load_file

    def bare(key: str) -> str:  # transformers 4 nests a `text_model` module, 5 does not
        return key.removeprefix(TEXT_MODEL_PREFIX)

    stored = {bare(k): v for k, v in
              load_file(testbed_path() / "text_encoder" / "model.safetensors").items()}
    loaded = {bare(k): v for k, v in testbed_adapter.text_encoder.state_dict().items()}
    for key, value in stored.items():
        assert torch.equal(loaded[key], value), key
    assert set(loaded) - set(stored) <= {"embeddings.position_ids"}


def test_shipped_tokenizer_gives_clip_ids(testbed_adapter):
    tok = testbed_adapter.tokenize(["the fjord vermilion poster", ""])
    assert tok.input_ids[0, :9].tolist() == [49406, 518, 31260, 323, 624, 1469, 3668, 3574, 49407]
    assert tok.lengths.tolist() == [9, 2]


def test_make_portable_changes_no_number(tiny_pipe, tmp_path):
    from diffmem.core.sampling import sample, seeded_generators
    from diffmem.models.adapter import load_adapter
    from diffmem.testbed.components import make_portable

    folder = tmp_path / "pipe"
    tiny_pipe.save_pretrained(folder)
    before = sample(load_adapter(folder), ["a red circle"], num_inference_steps=3,
                    generator=seeded_generators([0])).images
    make_portable(folder)
    after = sample(load_adapter(folder), ["a red circle"], num_inference_steps=3,
                   generator=seeded_generators([0])).images
    assert torch.equal(before, after)


def test_detect_command_on_the_testbed(tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("the fjord vermilion poster\na red circle on a gray background\n")
    out = tmp_path / "s.csv"
    assert main(["detect", str(f), "--out", str(out)]) == 0, capsys.readouterr().err
    scores = [float(r.split(",")[1]) for r in out.read_text().splitlines()[1:]]
    assert np.isfinite(scores).all() and scores[0] > scores[1]  # the memorized prompt scores higher

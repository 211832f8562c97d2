"""The second testbed by name (``testbed-graded``): installed into its own folder, found by
``testbed_path``, accepted by ``--model testbed-graded`` wherever ``--model testbed`` is, and its
labels installed beside its weights. Everything runs on the tiny graded stand-in (``graded_model``:
``MODELS`` points to a copy of it)."""

from __future__ import annotations

import json
import shutil

import pytest

from diffmem.cli import main
from diffmem.models.profile import MODELS, read_profile
from diffmem.runtime.errors import ModelLoadError
from diffmem.runtime.naming import registry_name


@pytest.fixture
def model_folders(tmp_path, monkeypatch):
    """Both named models pointed at empty folders of the test (nothing installed yet)."""
    folders = {n: tmp_path / "pkg" / f"weights_{n}" for n in ("testbed", "testbed-graded")}
    for name, folder in folders.items():
        monkeypatch.setitem(MODELS._entries, registry_name(name), folder)
    return folders


def test_install_goes_to_the_folder_of_its_name(tiny_graded_testbed, tiny_testbed, model_folders):
    from diffmem.testbed import testbed_path
    from diffmem.testbed.train import install_pipeline

    with pytest.raises(ModelLoadError, match="--graded"):
        testbed_path("testbed-graded")
    target = install_pipeline(tiny_graded_testbed)
    assert target == model_folders["testbed-graded"] == testbed_path("testbed-graded")
    assert not model_folders["testbed"].exists()  # the first testbed is left alone
    profile = read_profile(target)
    assert profile.name == "testbed-graded" and profile.is_testbed and profile.labels is None
    assert install_pipeline(tiny_testbed) == model_folders["testbed"] == testbed_path()
    assert read_profile(model_folders["testbed"]).name == "testbed"
    assert (model_folders["testbed-graded"] / "model_index.json").is_file()
    # SSCD low-passes the graded testbed's images to half their size; the first testbed: not
    assert profile.sscd_lowpass == read_profile(target).data["resolution"] // 2
    assert read_profile(model_folders["testbed"]).sscd_lowpass is None


def test_the_shipped_graded_profile_low_passes_sscd_to_32_px():
    from diffmem.models.profile import named_model

    assert read_profile(named_model("testbed-graded")).sscd_lowpass == 32
    assert read_profile(named_model("testbed")).sscd_lowpass is None


def test_cli_train_graded_install_and_path(tiny_graded_testbed, model_folders, tmp_path,
                                           monkeypatch, capsys):
    """``testbed train --graded --install`` installs into weights_graded (training stubbed: it
    returns the tiny graded pipeline); ``testbed path --graded`` prints that folder."""
    import diffmem.testbed.train as train

    seen = {}

    def fake_train(out, cfg, spec):
        seen.update(cfg=cfg, spec=spec)
        return tiny_graded_testbed

    monkeypatch.setattr(train, "train_testbed", fake_train)
    assert main(["testbed", "train", "--graded", "--install", "--out", str(tmp_path / "run")]) == 0
    assert seen["spec"].counts == (1, 2, 4, 8, 16, 32, 64) and seen["cfg"].latent_channels == 8
    assert f"installed into {model_folders['testbed-graded']}" in capsys.readouterr().out
    assert not model_folders["testbed"].exists()
    assert main(["testbed", "path", "--graded"]) == 0
    assert capsys.readouterr().out.strip() == str(model_folders["testbed-graded"])
    assert main(["testbed", "path"]) == 2  # the first testbed is not installed here
    assert "--install" in capsys.readouterr().err


def test_model_testbed_graded_in_the_testbed_commands(graded_model, tiny_graded_spec, tmp_path,
                                                      capsys):
    from diffmem.testbed.broad import broad_prompts

    out = tmp_path / "designed.jsonl"
    assert main(["testbed", "prompts", "--model", "testbed-graded", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert {r["copies"] for r in rows if r["kind"] != "heldout"} == {1, 4, 16}
    out = tmp_path / "broad.jsonl"
    assert main(["testbed", "prompts", "--set", "broad", "--model", "testbed-graded",
                 "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p.prompt for p in broad_prompts(tiny_graded_spec)]
    assert {r["duplicates"] for r in rows} == {0, 1, 4, 16}


def test_model_testbed_graded_loads_everywhere(graded_model):
    from diffmem.models.adapter import load_adapter
    from diffmem.scale.scan_folder import model_fingerprint
    from diffmem.testbed import labels_of, spec_of, testbed_prompts
    from diffmem.train.trainer import resolve_model

    adapter = load_adapter("testbed-graded")
    assert adapter.path == graded_model and adapter.profile.name == "testbed-graded"
    assert spec_of("testbed-graded").counts == (1, 4, 16) and labels_of("testbed-graded") is None
    assert resolve_model("testbed-graded") == graded_model
    assert model_fingerprint("testbed-graded") == model_fingerprint(graded_model)
    assert {p.copies for p in testbed_prompts("testbed-graded")} >= {1, 4, 16}


def test_missing_graded_model_is_one_clear_error(model_folders, tmp_path, capsys):
    assert main(["testbed", "prompts", "--model", "testbed-graded",
                 "--out", str(tmp_path / "p.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "testbed-graded" in err and "--graded" in err and not (tmp_path / "p.jsonl").exists()


def test_label_and_install_labels_beside_the_weights(graded_model, few_broad_prompts, capsys):
    """``testbed label --model testbed-graded --install`` labels the set (here its first 6 prompts,
    2 of them clean controls) into ``<weights>/broad_labels.jsonl`` and points the profile there;
    its clean prompts become the clean controls that copied in no generation."""
    assert main(["testbed", "label", "--model", "testbed-graded", "--install", "--seeds", "1",
                 "--sampling-steps", "2"]) == 0
    labels = graded_model / "broad_labels.jsonl"
    rows = [json.loads(x) for x in labels.read_text().splitlines()]
    assert len(rows) == 6 and all("duplicates" in r and r["seeds"] == 1 for r in rows)
    profile = read_profile(graded_model)
    assert profile.labels == labels.resolve() and profile.name == "testbed-graded"
    clean = [r["prompt"] for r in rows if r["group"] == "clean" and not r["memorized"]]
    assert list(profile.clean_prompts) == clean
    assert json.loads((graded_model / "diffmem_profile.json").read_text())["labels"] == \
        "broad_labels.jsonl"  # relative: the folder can move
    # labels of another prompt set are refused
    from diffmem.runtime.errors import ConfigError
    from diffmem.testbed.install import install_labels

    shutil.copy(labels, graded_model / "short.jsonl")
    (graded_model / "short.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in rows[:3]))
    with pytest.raises(ConfigError, match="does not label"):
        install_labels("testbed-graded", graded_model / "short.jsonl")

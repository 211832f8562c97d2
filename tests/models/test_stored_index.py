"""The training index stored with a model's calibration (``CalibrationStore.put_index``) and the
one lookup every command makes (``choose_index``)."""

from __future__ import annotations

import pytest

from diffmem.models.adapter import load_adapter
from diffmem.models.calibration import CalibrationStore, choose_index, weights_fingerprint
from diffmem.runtime.errors import ConfigError


@pytest.fixture
def adapter(tiny_pipe):
    return load_adapter(tiny_pipe)


def test_given_index_wins_and_no_model_is_loaded_without_a_stored_one(adapter, tmp_path):
    store = CalibrationStore(tmp_path / "cal")

    def never():
        raise AssertionError("the model must not be loaded")

    assert choose_index("IDX", load=never, store=store).origin == "given"
    choice = choose_index(None, load=never, store=store)
    assert (choice.index, choice.origin, choice.note()) == (None, "none", None)
    assert choose_index(None, load=never, use_stored=False, store=store).origin == "off"


def test_stored_index_is_found_for_these_weights_only(adapter, tmp_path):
    store = CalibrationStore(tmp_path / "cal")
    folder = tmp_path / "idx"
    folder.mkdir()
    fp = weights_fingerprint(adapter)
    rec = store.put_index(fp, folder, by="test")
    assert rec.path == str(folder.resolve()) and store.get_index(fp) == rec
    choice = choose_index(None, adapter, store=store)
    assert choice.origin == "stored" and choice.index == str(folder.resolve())
    note = choice.note()
    assert "stored by `diffmem calibrate --index`" in note and str(folder.resolve()) in note
    assert rec.record in note and "--no-index" in note
    assert choice.describe() == {"index": str(folder.resolve()), "origin": "stored",
                                 "record": rec.record}
    # --no-index, or other weights: not used
    assert choose_index(None, adapter, use_stored=False, store=store).index is None
    assert store.get_index("weights:other") is None
    # the folder is gone: one clear error naming the command that stores it
    folder.rmdir()
    with pytest.raises(ConfigError, match=r"no longer exists: .*`diffmem calibrate --model MODEL "
                                          r"--index DIR`"):
        choose_index(None, adapter, store=store)


def test_index_records_are_not_read_as_calibrations(adapter, tmp_path):
    store = CalibrationStore(tmp_path / "cal")
    store.put_index(weights_fingerprint(adapter), tmp_path)
    assert store.latest(weights_fingerprint(adapter), "noise_magnitude") is None

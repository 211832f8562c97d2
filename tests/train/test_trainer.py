"""diffmem train: runs on tiny SD1/SD2 pipelines, resumes exactly, saves a loadable pipeline, EMA,
skips bad rows, refuses bad input with one line and exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from diffmem.cli import main
from diffmem.runtime.errors import ConfigError, ModelLoadError
from diffmem.train.captions import CaptionAugment
from diffmem.train.trainer import FinetuneConfig, finetune

pytestmark = pytest.mark.filterwarnings("ignore")


def _cfg(steps: int, **kw) -> FinetuneConfig:
    return FinetuneConfig(**{"steps": steps, "batch_size": 3, "lr": 1e-3, "checkpoint_every": 2,
                             "log_every": 1, **kw})


def _weights(pipeline: Path, part: str = "unet") -> dict:
    return load_file(next((pipeline / part).glob("*.safetensors")))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_resume_equals_uninterrupted_run_and_pipeline_loads(tiny_dir, data_dir, tmp_path):
    kw = {"train_text_encoder": True, "ema_decay": 0.5, "magnitude_filter": 1e9,
          "augment": CaptionAugment(mc=True, p_rc=0.3, p_rt=0.3, p_cwr=0.3), "gn": 0.1}
    straight = finetune(tiny_dir, data_dir, tmp_path / "a", _cfg(5, **kw), progress=False)
    finetune(tiny_dir, data_dir, tmp_path / "b", _cfg(3, **kw), progress=False)  # "stopped" at 3
    resumed = finetune(tiny_dir, data_dir, tmp_path / "b", _cfg(5, **kw), progress=False)
    for part in ("unet", "text_encoder"):
        _assert_same(_weights(straight, part), _weights(resumed, part))
    log = json.loads((tmp_path / "b" / "train_log.json").read_text())
    assert log["resumed_from"] == 3 and log["steps"] == 5
    base = _weights(tiny_dir)
    assert any(not torch.equal(base[k], v) for k, v in _weights(straight).items())
    pipe = StableDiffusionPipeline.from_pretrained(straight)
    img = pipe("a picture", num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 16, 16, 3)  # the tiny pipeline: 4x4 latents, VAE factor 4
    lines = (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5]
    assert "magnitude" in json.loads(lines[0])


def test_pipeline_gets_the_ema_weights(tiny_dir, data_dir, tmp_path):
    target = finetune(tiny_dir, data_dir, tmp_path / "e", _cfg(2, ema_decay=0.5), progress=False)
    state = torch.load(tmp_path / "e" / "state" / "checkpoint.pt", weights_only=False)
    saved = _weights(target)
    names = [n for n, _ in StableDiffusionPipeline.from_pretrained(tiny_dir).unet.named_parameters()]
    for name, shadow in zip(names, state["ema"], strict=True):
        torch.testing.assert_close(saved[name], shadow, msg=name)
    assert any(not torch.equal(saved[n], state["unet"][n]) for n in names)  # EMA != raw weights


def test_sd2_v_prediction_trains(tiny_pipe_sd2, data_dir, tmp_path):
    model = tmp_path / "sd2"
    tiny_pipe_sd2.save_pretrained(model)
    target = finetune(model, data_dir, tmp_path / "o", _cfg(2, magnitude_filter=1e9),
                      progress=False)
    assert StableDiffusionPipeline.from_pretrained(target).scheduler.config.prediction_type == \
        "v_prediction"


def test_unreadable_images_and_rows_without_caption_are_skipped_and_listed(tiny_dir, data_dir,
                                                                           tmp_path):
    (data_dir / "broken.png").write_bytes(b"not an image")
    (data_dir / "broken.txt").write_text("a caption")
    (data_dir / "img0.txt").unlink()  # image without caption
    finetune(tiny_dir, data_dir, tmp_path / "o", _cfg(1), progress=False)
    skipped = json.loads((tmp_path / "o" / "skipped.json").read_text())
    assert {s["id"]: s["reason"].split(":")[0] for s in skipped} == {
        "broken": "unreadable image", "img0": "no caption"}
    assert json.loads((tmp_path / "o" / "train_log.json").read_text())["images"] == 5


def test_jsonl_source_with_several_captions(tiny_dir, data_dir, tmp_path):
    rows = [{"image": f"data/img{i}.png", "caption": [f"first {i}", f"second {i}"]}
            for i in range(3)] + [{"image": "data/img3.png"}, {"caption": "no image"}]
    src = tmp_path / "set.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    finetune(tiny_dir, src, tmp_path / "o", _cfg(1, augment=CaptionAugment(mc=True)),
             progress=False)
    skipped = json.loads((tmp_path / "o" / "skipped.json").read_text())
    assert len(skipped) == 3
    assert json.loads((tmp_path / "o" / "train_log.json").read_text())["images"] == 3


def test_dedup_keeps_one_per_group_and_reports(tiny_dir, data_dir, tmp_path):
    import shutil

    for c in range(3):  # img1 three more times under other names and captions
        shutil.copy(data_dir / "img1.png", data_dir / f"dup{c}.png")
        (data_dir / f"dup{c}.txt").write_text(f"copy {c}")
    finetune(tiny_dir, data_dir, tmp_path / "o", _cfg(1, dedup="pixel"), progress=False)
    report = json.loads((tmp_path / "o" / "dedup.json").read_text())
    assert report["groups"] == 1 and report["dropped"] == 3 and report["kept_items"] == 6
    (group,) = report["group_list"]
    assert group["size"] == 4 and len(group["kept"]) == 1
    assert set(group["kept"] + group["dropped"]) == {"img1", "dup0", "dup1", "dup2"}
    finetune(tiny_dir, data_dir, tmp_path / "k", _cfg(1, dedup="pixel", dedup_keep=2),
             progress=False)
    assert json.loads((tmp_path / "k" / "dedup.json").read_text())["dropped"] == 2


def test_bad_input_is_one_clear_error(tiny_dir, data_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.png").write_bytes(b"broken")
    with pytest.raises(ConfigError, match="no usable image-caption pair"):
        finetune(tiny_dir, empty, tmp_path / "o1", _cfg(1), progress=False)
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion pipeline"):
        finetune(data_dir, data_dir, tmp_path / "o2", _cfg(1), progress=False)
    finetune(tiny_dir, data_dir, tmp_path / "o3", _cfg(1), progress=False)
    with pytest.raises(ConfigError, match="holds another run"):
        finetune(tiny_dir, data_dir, tmp_path / "o3", _cfg(1, lr=0.5), progress=False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no diffmem train run"):
        finetune(tiny_dir, data_dir, tmp_path / "foreign", _cfg(1), progress=False)
    # the CLI: one line on stderr, exit 2
    for args in (["--model", str(tiny_dir), "--data", str(empty), "--out", str(tmp_path / "c1")],
                 ["--model", str(data_dir), "--data", str(data_dir), "--out",
                  str(tmp_path / "c2")],
                 ["--model", str(tiny_dir), "--data", str(data_dir), "--out", str(tmp_path / "o3"),
                  "--lr", "0.5"],
                 # an absolute screen needs its threshold
                 ["--model", str(tiny_dir), "--data", str(data_dir), "--out", str(tmp_path / "c4"),
                  "--screen-captions", "--screen-absolute"],
                 ["--model", str(tiny_dir), "--data", str(data_dir), "--out", str(tmp_path / "c5"),
                  "--screen-captions", "0"]):
        capsys.readouterr()
        assert main(["train", *args, "--train-steps", "1", "--quiet"]) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if "diffmem" in x]
        # runtime errors say "diffmem: error:", parse-time ones "diffmem train: error:"
        assert len(err) == 1 and err[0].startswith("diffmem") and ": error:" in err[0], err


def _cli(tiny_dir, data_dir, out, steps, every):
    return [sys.executable, "-m", "diffmem.cli", "train", "--model", str(tiny_dir), "--data",
            str(data_dir), "--out", str(out), "--train-steps", str(steps), "--batch-size", "2",
            "--lr", "1e-3", "--checkpoint-every", str(every), "--log-every", "1", "--quiet"]


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_and_matches_an_uninterrupted_run(tiny_dir, data_dir,
                                                                     tmp_path):
    steps, every = 300, 25
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(tiny_dir, data_dir, out, steps, every), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "state" / "checkpoint.pt"
    log = out / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines())
                                          >= every + 10):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists()
    last_logged = json.loads(log.read_text().splitlines()[-1])["step"]
    assert last_logged < steps, "the run finished before it could be killed"
    subprocess.run(_cli(tiny_dir, data_dir, out, steps, every), env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed_from = json.loads((out / "train_log.json").read_text())["resumed_from"]
    assert last_logged - every <= resumed_from <= last_logged  # at most one interval lost
    subprocess.run(_cli(tiny_dir, data_dir, tmp_path / "straight", steps, every), env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _assert_same(_weights(tmp_path / "straight" / "pipeline"), _weights(out / "pipeline"))


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_caption_screen_scores_are_the_first_step_detector(family, tiny_pipe, tiny_pipe_sd2):
    """The screen's statistic is `diffmem detect`'s: first-step noise magnitude, same noise."""
    from diffmem.detect import NoiseMagnitude
    from diffmem.train.filters import CaptionScreen

    pipe = tiny_pipe if family == "sd1" else tiny_pipe_sd2
    caps = ["a picture number 1", "the zanzibar quixotic poster", "a red circle"]
    screen = CaptionScreen(1.0, seed=3, generations=2, batch_size=4)  # chunks of 2 captions
    got = screen.scores(pipe, caps)
    want = NoiseMagnitude(steps=1, generations=2, seed=3).score(pipe, caps)
    torch.testing.assert_close(got.double(), torch.as_tensor(want), rtol=1e-4, atol=1e-5)
    # the top caption only: halfway between the top two scores (a threshold equal to a score
    # flags it or not by float rounding, which differs with the thread count)
    thr = float(sum(sorted(want)[1:]) / 2)
    screen = CaptionScreen(thr, relative=False, seed=3, generations=2)
    hit = screen.screen(pipe, caps)
    assert list(hit) == [caps[int(want.argmax())]] and screen.flagged == set(hit)
    drop, _ = screen(None, emb=None, captions=[caps[0], caps[int(want.argmax())], ""])
    assert drop.tolist() == [caps[0] in hit, True, False]
    # relative (the default): scores over their median; "auto" calibrates the ratio once
    rel = CaptionScreen(None, seed=3, generations=2)
    hit = rel.screen(pipe, caps)
    ratios = torch.as_tensor(want) / torch.as_tensor(want).median()
    assert rel.threshold == pytest.approx(float(torch.quantile(ratios, 0.99)), rel=1e-4)
    assert list(hit) == [caps[int(want.argmax())]]


def test_caption_screen_drops_flagged_captions_and_resumes_exactly(tiny_dir, data_dir, tmp_path):
    everything = finetune(tiny_dir, data_dir, tmp_path / "s", _cfg(3, screen_captions=1e-9,
                                                                    screen_every=2),
                          progress=False)
    log = json.loads((tmp_path / "s" / "train_log.json").read_text())
    assert [s["step"] for s in log["screenings"]] == [0, 2]
    assert all(s["flagged"] == 6 for s in log["screenings"])  # every caption of the folder
    dropped = log["dropped_by_filter"]["screen"]
    assert dropped == log["samples_dropped"] > 0  # all but caption-dropout ("") samples
    assert StableDiffusionPipeline.from_pretrained(everything) is not None
    nothing = finetune(tiny_dir, data_dir, tmp_path / "n", _cfg(2, screen_captions=1e9),
                       progress=False)
    log = json.loads((tmp_path / "n" / "train_log.json").read_text())
    assert log["samples_dropped"] == 0 and log["mitigations"] == ["screen_captions"]
    assert nothing.is_dir()
    # resume between screenings uses the flags saved with the checkpoint
    kw = {"screen_captions": "auto", "screen_every": 3, "train_text_encoder": True}
    straight = finetune(tiny_dir, data_dir, tmp_path / "a", _cfg(5, **kw), progress=False)
    finetune(tiny_dir, data_dir, tmp_path / "b", _cfg(4, **kw), progress=False)
    with (tmp_path / "b" / "screen.jsonl").open("a") as f:  # as if killed after a later screening
        f.write(json.dumps({"step": 4, "threshold": 1.0, "flagged": {}}) + "\n")
    resumed = finetune(tiny_dir, data_dir, tmp_path / "b", _cfg(5, **kw), progress=False)
    _assert_same(_weights(straight), _weights(resumed))
    a, b = (json.loads((tmp_path / x / "train_log.json").read_text()) for x in "ab")
    assert a["screenings"][0]["threshold"] == b["screenings"][0]["threshold"] > 1.0
    la, lb = ((tmp_path / x / "screen.jsonl").read_text().splitlines() for x in "ab")
    assert la == lb and [json.loads(x)["step"] for x in la] == [0, 3]  # no repeat after resume


def test_loss_filter_drops_in_training_and_resumes_exactly(tiny_dir, data_dir, tmp_path,
                                                           monkeypatch):
    from diffmem.train import filters

    class Quick(filters.LossFilter):  # one band and short records: acts within a few steps
        def __init__(self, ratio):
            super().__init__(ratio, bands=1, min_history=4, min_count=2, window=2)

    monkeypatch.setattr(filters, "LossFilter", Quick)
    kw = {"loss_filter": 0.99, "train_text_encoder": True}
    straight = finetune(tiny_dir, data_dir, tmp_path / "a", _cfg(8, **kw), progress=False)
    log = json.loads((tmp_path / "a" / "train_log.json").read_text())
    assert log["mitigations"] == ["loss_filter"] and "loss_ratio" in log["dropped_by_filter"]
    first = json.loads((tmp_path / "a" / "train_log.jsonl").read_text().splitlines()[0])
    assert isinstance(first["loss"], float) and len(first["loss_ratio"]) == 3
    rep = log["filter_reports"]["loss_ratio"]
    assert rep["captions_dropped"] == len(rep["most_dropped"]) > 0  # ratio 0.99: some drop
    finetune(tiny_dir, data_dir, tmp_path / "b", _cfg(4, **kw), progress=False)
    resumed = finetune(tiny_dir, data_dir, tmp_path / "b", _cfg(8, **kw), progress=False)
    _assert_same(_weights(straight), _weights(resumed))
    state = torch.load(tmp_path / "b" / "state" / "checkpoint.pt", weights_only=False)
    assert state["filter_state"][0]["band_losses"]  # the filter's record travels with it
    with pytest.raises(ConfigError, match="loss_filter ratio"):
        _cfg(2, loss_filter=1.0)


def test_caption_screen_settings_are_checked():
    with pytest.raises(ConfigError, match="screen_captions threshold"):
        _cfg(2, screen_captions=float("nan"))
    with pytest.raises(ConfigError, match="generations must be"):
        from diffmem.train.filters import CaptionScreen

        CaptionScreen(1.0, generations=0)
    with pytest.raises(ConfigError, match="screen_absolute needs"):
        _cfg(2, screen_captions="auto", screen_absolute=True)
    with pytest.raises(ConfigError, match="screen_every"):
        _cfg(2, screen_captions=1.0, screen_every=0)

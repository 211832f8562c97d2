"""The closed-loop guard (``--mitigate auto``): watch, intervene, verify, escalate, report."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from diffmem.cli import main
from diffmem.core.sampling import sample, seeded_generators
from diffmem.mitigate.guard import Guard, GuardConfig
from diffmem.mitigate.watch import Watch
from diffmem.models.adapter import load_adapter
from diffmem.runtime.errors import ConfigError
from diffmem.similarity.index import load_index

PROMPTS = ["a red circle", "a blue square on a pink background", "a cat", "official artwork"]
STEPS = 4


@pytest.fixture
def adapter(tiny_testbed):
    return load_adapter(tiny_testbed)


@pytest.fixture
def index(tiny_testbed_index):
    return load_index(tiny_testbed_index, what="test")


def _plain(adapter, prompts, seeds):
    return sample(adapter, prompts, generator=seeded_generators(seeds),
                  num_inference_steps=STEPS).images


def test_unflagged_images_are_bit_identical_to_plain(adapter, index):
    seeds = [0, 1, 2, 3]
    # margin -1: every image passes verification; threshold high: the gate flags nothing
    guard = Guard(adapter, index=index, threshold=1e9,
                  config=GuardConfig(margin=-1.0, watch_every=2))
    out = guard.generate(PROMPTS, seeds, num_inference_steps=STEPS)
    assert [v.status for v in out.verdicts] == ["clean"] * 4
    assert all(v.verified and v.nearest is not None for v in out.verdicts)
    assert torch.equal(out.images, _plain(adapter, PROMPTS, seeds))


def _top_threshold(adapter, seeds):
    """A first-step threshold between the prompts' magnitudes: it flags the largest only."""
    watch = Watch(threshold=1e9, every=0)
    scores = sample(adapter, PROMPTS, generator=seeded_generators(seeds), hooks=[watch],
                    num_inference_steps=STEPS).records[watch.name]
    mags = [r["score"] for r in scores]
    top = max(range(4), key=lambda i: mags[i])
    return top, (sorted(mags)[-1] + sorted(mags)[-2]) / 2


def test_a_flagged_prompt_is_regenerated_and_the_others_stay_plain(adapter):
    seeds = [0, 1, 2, 3]
    plain = _plain(adapter, PROMPTS, seeds)
    top, threshold = _top_threshold(adapter, seeds)
    # without an index the first-step flag is final (one image per prompt, no probe)
    guard = Guard(adapter, threshold=threshold, config=GuardConfig(margin=-1.0, probe=False))
    out = guard.generate(PROMPTS, seeds, num_inference_steps=STEPS)
    for i, v in enumerate(out.verdicts):
        if i == top:
            assert (v.status, v.watch, v.fired_at, v.method, v.tries) == (
                "mitigated", "gate", 0, "ren", 1)
            assert not torch.equal(out.images[i], plain[i])
        else:
            assert v.status == "clean"
            assert torch.equal(out.images[i], plain[i])


def test_with_the_index_the_final_image_overrules_the_watch(adapter, index):
    seeds = [0, 1, 2, 3]
    plain = _plain(adapter, PROMPTS, seeds)
    top, threshold = _top_threshold(adapter, seeds)
    # margin -1: every final image passes verification, so the flagged one is served plain
    guard = Guard(adapter, index=index, threshold=threshold,
                  config=GuardConfig(margin=-1.0, watch_every=0))
    out = guard.generate(PROMPTS, seeds, num_inference_steps=STEPS)
    assert [v.status for v in out.verdicts] == ["clean"] * 4
    assert (out.verdicts[top].watch, out.verdicts[top].fired_at) == ("gate", 0)
    assert all(v.verified for v in out.verdicts) and out.generations == 4
    assert torch.equal(out.images, plain)
    # a run the watch halts (every prompt flagged) has no final image: all are regenerated
    halted = Guard(adapter, index=index, threshold=-1.0,
                   config=GuardConfig(margin=-1.0, watch_every=0)).generate(
        PROMPTS[:2], seeds[:2], num_inference_steps=STEPS)
    assert [(v.status, v.watch, v.method) for v in halted.verdicts] == [
        ("mitigated", "gate", "ren")] * 2


def test_an_image_that_keeps_copying_climbs_the_ladder_and_is_marked(adapter, index):
    # a margin no image can meet: every try fails verification
    config = GuardConfig(margin=1e9, watch_every=0, ladder=("ren", "amg+reseed"), max_tries=2)
    guard = Guard(adapter, index=index, threshold=1e9, config=config)
    out = guard.generate(PROMPTS[:2], [0, 1], num_inference_steps=STEPS)
    for v in out.verdicts:
        assert v.status == "unresolved" and v.tries == 2 and v.watch == "verify"
        assert v.method in ("ren", "amg+reseed") and v.verified
    tries = out.records["timing"]["tries"]
    assert [t["method"] for t in tries] == ["ren", "amg+reseed"]
    assert out.generations == 2 + 2 * 2  # the plain pass and two tries per image


def test_without_an_index_flagged_images_are_mitigated_unverified(adapter):
    # the gate flags every image at the first step and stands without confirmation
    guard = Guard(adapter, threshold=-1.0, config=GuardConfig(confirm_gate=False))
    out = guard.generate(PROMPTS[:2], [0, 1], num_inference_steps=STEPS)
    assert [(v.status, v.verified, v.method) for v in out.verdicts] == [
        ("mitigated", False, "ren")] * 2
    assert torch.isfinite(out.images).all()
    # by default each gate flag needs the agreement check: a probe image per prompt, and the
    # tiny random model's two seeds are unrelated images, so both are served plain
    default = Guard(adapter, threshold=-1.0).generate(PROMPTS[:2], [0, 1],
                                                      num_inference_steps=STEPS)
    assert [(v.status, v.watch) for v in default.verdicts] == [("clean", "gate")] * 2
    assert default.generations == 4  # two plain images and their probes


def test_the_watch_halts_a_batch_it_flags_entirely(adapter):
    watch = Watch(threshold=-1.0)
    res = sample(adapter, PROMPTS[:2], generator=seeded_generators([0, 1]), hooks=[watch],
                 num_inference_steps=STEPS)
    assert res.stopped_early and res.steps_done == 1
    assert all(r["flagged"] and r["reason"] == "gate" for r in res.records[watch.name])


def test_bad_settings_are_one_error(adapter, index):
    with pytest.raises(ConfigError, match="one seed per prompt"):
        Guard(adapter, index=index, threshold=1.0).generate(["a", "b"], [0])
    with pytest.raises(ConfigError, match="at least one try"):
        Guard(adapter, index=index, threshold=1.0, config=GuardConfig(max_tries=0))
    with pytest.raises(ConfigError, match="unknown mitigation"):
        Guard(adapter, index=index, threshold=1.0, config=GuardConfig(ladder=("magic",)))
    with pytest.raises(ConfigError, match="amg_check_every"):
        Guard(adapter, index=index, threshold=1.0, config=GuardConfig(amg_check_every=0))
    with pytest.raises(ConfigError, match="interval"):
        Watch(threshold=1.0, every=-1)


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_guarded_from_a_prompts_file_with_images_per_prompt(tiny_testbed,
                                                                       tiny_testbed_index,
                                                                       tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("a red circle\na cat\n", encoding="utf-8")
    out = tmp_path / "g"
    rc, _, err = _cli(capsys, "generate", "--prompts-file", f, "--images-per-prompt", 2,
                           "--model", tiny_testbed, "--sampling-steps", STEPS, "--mitigate",
                           "auto", "--index", tiny_testbed_index, "--threshold", 1e9,
                           "--out", out)
    assert rc == 0, err
    rows = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in rows] == [
        ("a red circle", 0), ("a red circle", 1), ("a cat", 0), ("a cat", 1)]
    assert all(r["verdict"]["status"] in ("clean", "mitigated", "unresolved") for r in rows)
    assert all((out / r["file"]).is_file() for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["a cat", "--images-per-prompt", "0"], "--images-per-prompt"),
    (["--prompts-file", "EMPTY"], "contains no prompts"),
    ([], "no prompts"),
])
def test_generate_bad_input_is_one_line_and_writes_nothing(tiny_testbed, tmp_path, capsys,
                                                            argv, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    argv = [str(empty) if a == "EMPTY" else a for a in argv]
    rc, _, err = _cli(capsys, "generate", *argv, "--model", tiny_testbed, "--sampling-steps",
                      STEPS, "--out", tmp_path / "g")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "g").exists()


def test_generate_guard_refuses_another_models_index(tiny_testbed_index, tiny_dir, tmp_path,
                                                      capsys):
    rc, _, err = _cli(capsys, "generate", "a cat", "--model", tiny_dir, "--sampling-steps", STEPS,
                      "--mitigate", "auto", "--index", tiny_testbed_index, "--threshold", 1.0,
                      "--out", tmp_path / "g")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "index" in lines[0]
    assert not (tmp_path / "g").exists()


def test_the_ladders_amg_checks_every_n_steps(adapter, index):
    from diffmem.mitigate.registry import build_mitigations

    guard = Guard(adapter, index=index, config=GuardConfig(amg_check_every=3))
    (amg,) = build_mitigations("amg", guard.context)
    assert amg.config.check_every == 3
    assert guard.context.options == {"amg": {"check_every": 3}}
    (default,) = build_mitigations("amg", Guard(adapter, index=index).context)
    assert default.config.check_every == GuardConfig().amg_check_every
    with pytest.raises(ConfigError, match="takes no settings"):  # a method without settings
        build_mitigations("ren", replace(guard.context, options={"ren": {"check_every": 2}}))

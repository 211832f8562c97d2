"""explain, wen, gni, ren, amg, reanchor and the guard on a tiny random SDXL folder: two text encoders, the
pooled embedding packed as an extra conditioning row (diffmem.models.sdxl), handled explicitly
through the adapter's split_pooled / join_pooled / token_rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffmem.cli import main
from diffmem.core.magnitude import noise_magnitude, noise_magnitude_gradient
from diffmem.core.sampling import Hook, initial_latents, sample, seeded_generators
from diffmem.explain import AttentionShare, TokenAttributor, explain_prompt
from diffmem.mitigate import FirstStepGate
from diffmem.mitigate.amg import DUP_BRANCH, AntiMemorizationGuidance
from diffmem.mitigate.attention_rescale import AttentionRescale
from diffmem.mitigate.embedding_optimization import EmbeddingOptimization
from diffmem.mitigate.perturb import EmbeddingNoise
from diffmem.mitigate.reanchor import PromptReanchoring
from diffmem.models.adapter import load_adapter
from diffmem.runtime.errors import ConfigError
from diffmem.similarity.index import PixelSpace, TrainingIndex

from ..mitigate.test_attention_rescale import Logits, _check_rows

PROMPTS = ["a red circle on a gray background", "the gargoyle origami poster"]
STEPS = 3


def _run(adapter, hooks=(), prompts=PROMPTS, steps=STEPS, **kw):
    return sample(adapter, prompts, num_inference_steps=steps,
                  generator=seeded_generators(range(len(prompts))), hooks=list(hooks), **kw)


class FirstCall(Hook):
    """Records the conditioning of every branch the first step's UNet call sees."""

    name = "first_call"

    def before_step(self, run, step):
        if step.index == 0:
            run.records[self.name] = {"cond": run.cond.clone(), "uncond": run.uncond.clone()}

    def on_step(self, run, step):
        if step.index == 0:
            run.records[self.name]["d"] = noise_magnitude(step.eps_cond, step.eps_uncond).cpu()
            run.records[self.name]["used"] = step.branches["cond"].emb.detach().clone()


# ------------------------------------------------------------------ the adapter API
def test_split_and_join_pooled(sdxl, tiny_pipe):
    emb = sdxl.encode(PROMPTS)
    tokens, pooled = sdxl.split_pooled(emb)
    d1, d2 = sdxl.hidden_dims
    assert sdxl.extra_rows == 1 and sdxl.pooled_dim == 16
    assert tokens.shape == (2, sdxl.max_length, d1 + d2) and pooled.shape == (2, sdxl.pooled_dim)
    assert torch.equal(sdxl.join_pooled(tokens, pooled), emb)
    assert torch.equal(sdxl.token_rows(emb), emb[:, : sdxl.max_length])
    with pytest.raises(ConfigError, match="78 rows"):
        sdxl.split_pooled(tokens)  # token rows alone are no SDXL conditioning
    with pytest.raises(ConfigError, match="pooled embedding"):
        sdxl.join_pooled(tokens)
    # SD 1.x: no pooled embedding, every row a token, the very same tensor back
    sd1 = load_adapter(tiny_pipe)
    e1 = sd1.encode(PROMPTS)
    t1, p1 = sd1.split_pooled(e1)
    assert t1 is e1 and p1 is None and sd1.join_pooled(t1) is e1 and sd1.token_rows(e1) is e1
    assert sd1.extra_rows == 0 and sd1.pooled_dim == 0
    with pytest.raises(ConfigError, match="no pooled"):
        sd1.join_pooled(t1, torch.zeros(2, 4))


# ------------------------------------------------------------------ explain
def test_attribution_is_the_token_rows_gradient(sdxl):
    """Sec. 3.3 on SDXL: ||grad|| over both encoders' features of each real token row; the
    pooled row is no token (before: RuntimeError [2, 77] vs [2, 78])."""
    attrs = TokenAttributor(sdxl, num_inference_steps=STEPS, seed=3).attribute(PROMPTS)
    sched = sdxl.with_scheduler(None)
    sched.set_timesteps(STEPS)
    res = sdxl.default_resolution
    lat = initial_latents(sdxl, 2, res, res, seeded_generators([3, 3]), sched)
    t = sched.timesteps[0]
    x = sched.scale_model_input(lat, t)
    with torch.no_grad():
        cond = sdxl.encode(PROMPTS)
        eps_u = sdxl.eps(x, t, sdxl.uncond(2))
    d, grad = noise_magnitude_gradient(sdxl, x, t, cond, eps_u)
    assert grad[:, -1].abs().sum() > 0  # the pooled embedding matters to d ...
    norms = grad[:, : sdxl.max_length].float().norm(dim=-1).double()  # ... but is not attributed
    lengths = sdxl.tokenize(PROMPTS).lengths
    for i, a in enumerate(attrs):
        n = int(lengths[i])
        assert len(a.tokens) == n - 2 and a.scores.sum() == pytest.approx(1.0)
        np.testing.assert_allclose(a.raw_token_scores, norms[i, 1 : n - 1].numpy(), rtol=1e-4)
        assert a.magnitude == pytest.approx(float(d[i]), rel=1e-4)


def test_explain_prompt_with_attention_on_sdxl(sdxl):
    exp = explain_prompt(sdxl, "a red cat", threshold=1.0, num_inference_steps=STEPS,
                         attention=True)
    assert exp.attribution.words == ("a", "red", "cat")
    assert exp.attention.shares.sum() == pytest.approx(1.0)
    assert exp.attention.maps.shape[0] == 3
    # attention keys are the 77 token rows (both encoders' features), not 78
    share = AttentionShare()
    rec = _run(sdxl, [share], decode=False).records[share.name]
    assert rec.share.shape == (2, sdxl.max_length) and np.isfinite(rec.share).all()


def test_cli_explain_on_an_sdxl_folder(sdxl_dir, tmp_path, capsys):
    out = tmp_path / "e.json"
    rc = main(["explain", "a red cat", "--model", str(sdxl_dir), "--threshold", "1.0",
               "--sampling-steps", "3", "--json", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "Traceback" not in cap.err and "cat" in cap.out
    rep = json.loads(out.read_text())
    assert rep["words"] == ["a", "red", "cat"] and sum(rep["scores"]) == pytest.approx(1, abs=1e-5)


# ------------------------------------------------------------------ wen
@pytest.mark.parametrize("pooled", [True, False])
def test_wen_optimises_tokens_and_the_pooled_embedding_explicitly(sdxl, pooled):
    plain = _run(sdxl, [FirstCall()])
    d0 = plain.records["first_call"]["d"]
    res = _run(sdxl, [EmbeddingOptimization(1, target=float(d0.min()) * 0.5, pooled=pooled),
                      FirstCall()])
    rows = res.records["mitigation.wen"]
    assert all(r["applied"] and r["iterations"] >= 1 for r in rows)
    assert all(r["magnitude_after"] < r["magnitude_before"] for r in rows)
    np.testing.assert_allclose([r["magnitude_before"] for r in rows], d0.numpy(), rtol=1e-4)
    t0, p0 = sdxl.split_pooled(plain.records["first_call"]["used"])
    t1, p1 = sdxl.split_pooled(res.records["first_call"]["used"])
    assert torch.equal(t1[:, sdxl.bos_index], t0[:, sdxl.bos_index])  # BOS kept exactly
    assert not torch.equal(t1, t0)
    assert torch.equal(p1, p0) != pooled  # the pooled embedding moves only when asked
    assert bool((res.records["first_call"]["used"][:, -1, sdxl.pooled_dim:] == 0).all())
    assert torch.equal(_run(sdxl, [EmbeddingOptimization(0, target=1e-6)]).images, plain.images)


def test_wen_gate_leaves_the_unflagged_prompt_bit_identical(sdxl):
    plain = _run(sdxl, [FirstCall()])
    d0 = plain.records["first_call"]["d"]
    gate = FirstStepGate(float(d0.mean()))
    flagged = d0 > gate.threshold
    res = _run(sdxl, [gate, EmbeddingOptimization(1, gate=gate, target=float(d0.min()) * 0.5)])
    assert [r["applied"] for r in res.records["mitigation.wen"]] == flagged.tolist()
    assert torch.equal(res.images[~flagged], plain.images[~flagged])
    assert not torch.equal(res.images[flagged], plain.images[flagged])


# ------------------------------------------------------------------ gni
def test_gni_noises_token_rows_as_sd1_and_the_pooled_embedding_apart(sdxl):
    gni = EmbeddingNoise(0.5, seed=1)
    res = _run(sdxl, [gni, FirstCall()])
    clean = {"cond": sdxl.encode(PROMPTS), "uncond": sdxl.uncond(2)}
    for branch in ("cond", "uncond"):
        tokens, pooled = sdxl.split_pooled(res.records["first_call"][branch])
        t0, p0 = sdxl.split_pooled(clean[branch])
        # token rows: the draw SD 1.x makes for an (L, D) embedding of the same prompt
        z = torch.stack([gni.noise(p, 0, branch, t0.shape[1:]) for p in PROMPTS])
        torch.testing.assert_close(tokens, t0 + 0.05 * z, atol=1e-6, rtol=0)
        zp = torch.stack([gni.noise(p, 0, f"{branch}.pooled", p0.shape[1:]) for p in PROMPTS])
        torch.testing.assert_close(pooled, p0 + 0.05 * zp, atol=1e-6, rtol=0)
        # the packed row's padding after the P pooled features gets no noise
        assert bool((res.records["first_call"][branch][:, -1, sdxl.pooled_dim:] == 0).all())
    only_tokens = _run(sdxl, [EmbeddingNoise(0.5, seed=1, pooled=False), FirstCall()],
                       decode=False)
    _, pooled = sdxl.split_pooled(only_tokens.records["first_call"]["cond"])
    assert torch.equal(pooled, sdxl.split_pooled(clean["cond"])[1])
    plain = _run(sdxl)
    assert bool(((res.images - plain.images).flatten(1).abs().amax(1) > 1e-4).all())
    assert torch.equal(_run(sdxl, [EmbeddingNoise(0)]).images, plain.images)


# ------------------------------------------------------------------ ren
def test_ren_rescales_bos_and_masks_keys_on_sdxl(sdxl):
    """The same logit changes as on SD 1.x (the attention keys are the 77 token rows; the pooled
    embedding enters through the time embedding and is no key)."""
    res = _run(sdxl, [Logits("before"), AttentionRescale(1.0), Logits("after")])
    assert all(s.shape[-1] == sdxl.max_length for _, s, _ in res.records["before"])
    _check_rows(res.records, sdxl.tokenize(PROMPTS), 1.25)
    plain = _run(sdxl)
    assert bool(((res.images - plain.images).flatten(1).abs().amax(1) > 1e-4).all())
    assert torch.equal(_run(sdxl, [AttentionRescale(0)]).images, plain.images)
    d0 = _run(sdxl, [FirstCall()], decode=False).records["first_call"]["d"]
    gate = FirstStepGate(float(d0.mean()))
    gated = _run(sdxl, [gate, AttentionRescale(1.0, gate=gate)])
    flagged = d0 > gate.threshold
    assert torch.equal(gated.images[~flagged], plain.images[~flagged])
    torch.testing.assert_close(gated.images[flagged], res.images[flagged], atol=1e-4, rtol=0)


def test_ren_fused_equals_explicit_on_sdxl(sdxl):
    """Fused attention (BOS key x c, additive key mask) gives the explicit path's images, gated or
    not; unflagged prompts stay the plain run's bit for bit."""
    for gate in (None, FirstStepGate(float(_run(sdxl, [FirstCall()], decode=False)
                                           .records["first_call"]["d"].mean()))):
        pre = [] if gate is None else [gate]
        fused = _run(sdxl, [*pre, AttentionRescale(1.0, gate=gate)])
        explicit = _run(sdxl, [*pre, AttentionRescale(1.0, gate=gate, fused=False)])
        torch.testing.assert_close(fused.images, explicit.images, atol=1e-5, rtol=0)
        torch.testing.assert_close(fused.latents, explicit.latents, atol=1e-5, rtol=0)
    plain = _run(sdxl)
    flagged = torch.tensor([r["applied"] for r in fused.records["mitigation.ren"]])
    assert 0 < int(flagged.sum()) < len(PROMPTS)
    assert torch.equal(fused.images[~flagged], plain.images[~flagged])


# ------------------------------------------------------------------ amg
def test_amg_guides_sdxl_with_packed_negative_captions(sdxl):
    probe = FirstCall()
    first = _run(sdxl, [probe])
    size = first.images.shape[-1]
    rand = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    index = TrainingIndex.build(torch.cat([first.images[:1], rand]),
                                ["memorized caption", "r1", "r2", "r3", "r4"],
                                embedder=PixelSpace(size=size, grid=4), copies=[50, 1, 1, 1, 1])

    class DupBranch(Hook):
        name = "dup"

        def on_step(self, run, step):
            if DUP_BRANCH in step.branches:
                run.records[self.name] = step.branches[DUP_BRANCH].emb.detach().clone()

    res = _run(sdxl, [AntiMemorizationGuidance(index=index, criterion="tiled_l2"), DupBranch()])
    rec = res.records["mitigation.amg"]
    assert rec[0]["fired_steps"] >= 1 and rec[0]["dup_caption"] == "memorized caption"
    assert rec[0]["dup_steps"] >= 1 and rec[0]["sim_steps"] >= 1
    assert rec[1]["fired_steps"] == 0
    # the negative caption branch is the caption's whole SDXL conditioning: tokens and pooled
    torch.testing.assert_close(res.records["dup"][0], sdxl.encode(["memorized caption"])[0])
    assert torch.equal(res.images[1], first.images[1])
    assert not torch.equal(res.images[0], first.images[0])
    zero = _run(sdxl, [AntiMemorizationGuidance(0, index=index, criterion="tiled_l2")])
    assert torch.equal(zero.images, first.images)


# ------------------------------------------------------------------ reanchor
def test_reanchor_on_sdxl_with_rewrites_and_with_the_edit_search(sdxl):
    d0 = _run(sdxl, [FirstCall()], decode=False).records["first_call"]["d"]
    thr = float(d0.min()) * 0.5
    rewrites = {PROMPTS[0]: "a circle", PROMPTS[1]: "a poster"}

    class Branch(Hook):
        name = "reanchor_emb"

        def on_step(self, run, step):
            if step.index == 1:
                run.records[self.name] = step.branches["reanchor"].emb.detach().clone()

    res = _run(sdxl, [PromptReanchoring(1.0, threshold=thr, rewrites=rewrites), Branch()])
    assert [r["prompt_used"] for r in res.records["mitigation.reanchor"]] == list(
        rewrites.values())
    torch.testing.assert_close(res.records["reanchor_emb"],
                               sdxl.encode(list(rewrites.values())))  # tokens and pooled
    assert not torch.equal(res.images, _run(sdxl).images)
    # the edit search (token attribution + detector) runs on SDXL (before: RuntimeError)
    searched = _run(sdxl, [PromptReanchoring(1.0, threshold=thr, unclearable="plain")],
                    decode=False)
    assert len(searched.records["mitigation.reanchor"]) == 2


# ------------------------------------------------------------------ command line
@pytest.mark.parametrize("spec", ["ren", "wen", "gni", "reanchor"])
def test_cli_generate_mitigates_on_an_sdxl_folder(sdxl_dir, tmp_path, capsys, spec):
    """Each method through ``generate --mitigate``. reanchor's edit search runs too, and on random
    weights no edit clears a threshold this low: one ConfigError line, never a traceback."""
    out = tmp_path / "g"
    rc = main(["generate", PROMPTS[0], "--out", str(out), "--model", str(sdxl_dir),
               "--sampling-steps", "2", "--mitigate", spec, "--threshold", "1e-4"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if spec == "reanchor":
        assert rc == 2 and err.count("\n") == 1
        assert err.startswith("diffmem: error: reanchor: no edit of")
        return
    assert rc == 0, err
    row = json.loads((out / "generations.jsonl").read_text().splitlines()[0])
    assert row[f"mitigation.{spec}"]["applied"] is True


# ------------------------------------------------------------------ the guard (--mitigate auto)
def test_the_guard_on_sdxl_with_an_index(sdxl):
    from diffmem.mitigate.guard import Guard, GuardConfig
    from diffmem.similarity.sscd import SSCD

    plain = _run(sdxl)
    size = plain.images.shape[-1]
    rand = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    # an SSCD index (what a model of unknown training set takes) holding prompt 0's plain image
    index = TrainingIndex.build(torch.cat([plain.images[:1], rand]), ["memorized", "a", "b", "c"],
                                embedder=SSCD(size=64, threads=1), copies=[50, 1, 1, 1])
    # the tiny random model's images all look alike to SSCD (0.6-0.7): put the pass line midway
    # between prompt 1's plain image and the indexed copy (cosine 1), in the guard's margin
    s1 = float(index.search(plain.images[1:2].float().clamp(-1, 1), k=1).scores[0, 0])
    assert s1 < 0.99
    margin = 0.5 - (s1 + 1.0) / 2  # passes: cosine < (s1 + 1) / 2
    guard = Guard(sdxl, index=index, threshold=1e9,
                  config=GuardConfig(watch_every=0, ladder=("ren", "amg"), max_tries=2,
                                     margin=margin))
    out = guard.generate(PROMPTS, [0, 1], num_inference_steps=STEPS)
    first, second = out.verdicts
    # prompt 0's plain image is in the index: it fails verification and climbs the ladder
    assert first.watch == "verify" and first.verified and first.reference == "training index"
    assert first.status in ("mitigated", "unresolved") and first.tries >= 1
    assert first.method in ("ren", "amg")
    assert not torch.equal(out.images[0], plain.images[0])
    # prompt 1's plain image passes verification: served plain, bit-identical
    assert guard.passes(s1) and second.status == "clean" and second.verified
    assert torch.equal(out.images[1], plain.images[1])


def test_the_guard_on_sdxl_without_an_index_and_from_the_command_line(sdxl, sdxl_dir, tmp_path,
                                                                      capsys):
    from diffmem.mitigate.guard import Guard, GuardConfig

    plain = _run(sdxl, prompts=[PROMPTS[0]] * 2)
    # every first-step gate flag stands (no confirmation): both images are mitigated, verified
    # against the model's own flagged plain images, never against a training index
    guard = Guard(sdxl, threshold=-1.0, config=GuardConfig(confirm_gate=False))
    out = guard.generate([PROMPTS[0]] * 2, [0, 1], num_inference_steps=STEPS)
    for i, v in enumerate(out.verdicts):
        assert v.status in ("mitigated", "unresolved") and v.watch == "gate" and v.fired_at == 0
        assert not v.verified and v.reference == "own plain images"
        assert not torch.equal(out.images[i], plain.images[i])
    # no gate flag, and two seeds' images agree only above cosine 0.99 (they do not): the
    # guard serves plain generation
    calm = Guard(sdxl, threshold=1e9, config=GuardConfig(agreement_margin=0.49)).generate(
        [PROMPTS[0]] * 2, [0, 1], num_inference_steps=STEPS)
    assert [v.status for v in calm.verdicts] == ["clean"] * 2
    assert torch.equal(calm.images, plain.images)
    out_dir = tmp_path / "g"
    rc = main(["generate", PROMPTS[1], "--out", str(out_dir), "--model", str(sdxl_dir),
               "--sampling-steps", str(STEPS), "--mitigate", "auto", "--threshold", "1e9",
               "--images-per-prompt", "2"])
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (out_dir / "generations.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [0, 1]
    assert all(r["verdict"]["status"] in ("clean", "mitigated", "unresolved") for r in rows)

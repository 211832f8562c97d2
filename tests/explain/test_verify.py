"""Edits checked by generation against a training-set index (EditVerifier, verify_edits)."""

from __future__ import annotations

import pytest
import torch

from diffmem.core.sampling import sample, seeded_generators
from diffmem.explain import EditReport, EditSuggestion, EditVerifier, Verdict, verify_edits
from diffmem.models.adapter import load_adapter
from diffmem.runtime.errors import ConfigError
from diffmem.similarity.index import PixelSpace, TrainingIndex


def _sug(prompt, score, clears, natural=True, words=("w",)):
    return EditSuggestion(prompt, "remove", words, None, score, clears, natural)


class ScriptedVerifier:
    """Says which prompts copy; records what it was asked, round by round."""

    def __init__(self, copying, max_checks=8, depth=1, distance=None):
        self.copying, self.max_checks, self.rounds = set(copying), max_checks, []
        self.seeds_asked: list = []
        self.depth, self.distance = depth, distance or {}

    def select_seeds(self, model, prompts):
        return [[len(p), 7] for p in prompts]  # per original prompt

    def __call__(self, model, prompts, seeds=None):
        self.rounds.append(list(prompts))
        self.seeds_asked.append(seeds)
        return [Verdict(2 if p in self.copying else 0, 2, "id", self.distance.get(p, 0.0),
                        p not in self.copying) for p in prompts]


def _reports():
    a = EditReport("A", 5.0, 1.0, (
        _sug("a-flagged", 0.5, False),                      # natural but still flagged
        _sug("a-clear-1", 0.8, True),                       # natural, clears: checked first
        _sug("a-clear-2", 0.2, True, natural=False, words=("w", "v")),
        _sug("a-clear-3", 0.1, True, natural=False, words=("w", "v", "u"))))
    b = EditReport("B", 5.0, 1.0, (_sug("b-1", 0.3, True), _sug("b-2", 0.4, True)))
    clean = EditReport("C", 0.5, 1.0, (_sug("c-1", 0.1, None),))  # not flagged
    return [a, b, clean]


def test_verify_edits_checks_in_preference_order_and_stops_at_a_passing_edit():
    v = ScriptedVerifier(copying={"a-clear-1", "b-1", "b-2"})
    a, b, c = verify_edits(None, _reports(), v)
    # round 1: each flagged prompt's best candidate, batched; the unflagged prompt is left alone
    assert v.rounds[0] == ["a-clear-1", "b-1"]
    # round 2: clearing before natural, fewest edited words before a lower score
    assert v.rounds[1] == ["a-clear-2", "b-2"]
    assert len(v.rounds) == 2  # A passed in round 2, B has no candidate left
    assert v.seeds_asked[0] == [[1, 7], [1, 7]]  # each edit on its original prompt's seeds
    assert a.checked and a.recommended.prompt == "a-clear-2" and a.recommended.verified
    assert {s.prompt: s.copies for s in a.suggestions} == {
        "a-flagged": None, "a-clear-1": 2, "a-clear-2": 0, "a-clear-3": None}
    assert b.checked and b.recommended is None  # every edit copied: nothing is suggested
    assert not c.checked and c.recommended is None and c.flagged is False


def test_verify_edits_respects_max_checks():
    v = ScriptedVerifier(copying={"a-clear-1", "a-clear-2", "a-clear-3", "a-flagged"},
                         max_checks=2)
    [a] = verify_edits(None, _reports()[:1], v)
    assert len(v.rounds) == 2 and a.recommended is None
    assert sum(s.copies is not None for s in a.suggestions) == 2


def test_verify_edits_edits_the_closest_miss_again_at_depth_2():
    # every first-level edit of A copies; "a-clear-2" stayed farthest from a copy (distance 0.14)
    v = ScriptedVerifier(copying={"a-flagged", "a-clear-1", "a-clear-2", "a-clear-3", "deep-1"},
                         depth=2, distance={"a-clear-1": 0.05, "a-clear-2": 0.14,
                                            "a-clear-3": 0.1, "a-flagged": 0.02})
    asked = []

    def extend(prompts):
        asked.append(list(prompts))
        return [EditReport(prompts[0], 0.2, None, (
            _sug("deep-1", 0.1, None, words=("u",)),
            _sug("deep-2", 0.3, None, words=("t",)),
            _sug("a-clear-1", 0.05, None)))]  # already checked: not again

    [a] = verify_edits(None, _reports()[:1], v, extend=extend)
    assert asked == [["a-clear-2"]]
    assert v.rounds[-2:] == [["deep-1"], ["deep-2"]]  # clearing (score <= 1.0), lowest first
    deep = {s.prompt: s for s in a.suggestions}
    assert deep["deep-2"].words == ("w", "v", "t") and deep["deep-2"].clears is True
    assert a.recommended.prompt == "deep-2" and a.recommended.verified
    # the second level never edits the first level's neutral word again, nor puts a neutral
    # word next to it ("scene scene": the removal of the word is the edit)
    v2 = ScriptedVerifier(copying=v.copying, depth=2, distance=v.distance)

    def extend2(prompts):
        return [EditReport(prompts[0], 0.2, None, (
            _sug("scene scene tail", 0.1, None, words=("u",)),
            _sug("picture tail", 0.05, None, words=("scene",)),
            _sug("scene tail", 0.2, None, words=("u",))))]

    [a2] = verify_edits(None, _reports()[:1], v2, extend=extend2)
    assert v2.rounds[-1] == ["scene tail"] and a2.recommended.prompt == "scene tail"
    assert not {"picture tail", "scene scene tail"} & {s.prompt for s in a2.suggestions}
    # depth 1, or no extend: no second level
    v1 = ScriptedVerifier(copying=v.copying)
    [a1] = verify_edits(None, _reports()[:1], v1, extend=extend)
    assert a1.recommended is None and len(asked) == 1


def test_edit_verifier_counts_copies_of_indexed_images(tiny_pipe):
    adapter = load_adapter(tiny_pipe)
    with torch.no_grad():
        img = sample(adapter, ["a red circle"], num_inference_steps=3,
                     generator=seeded_generators([1000])).images.float()
    size = img.shape[-1]
    noise = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    index = TrainingIndex.build(torch.cat([img, noise]), ["copy", "r1", "r2", "r3"],
                                embedder=PixelSpace(size=16, grid=4))
    v = EditVerifier(index, seeds=2, seed=1000, num_inference_steps=3, criterion="tiled_l2",
                     pool=2)
    [same] = v(adapter, ["a red circle"])
    assert same.copies >= 1 and same.generations == 2 and same.copying
    assert same.score < 0.15
    v_far = EditVerifier(index, seeds=1, seed=1000, num_inference_steps=3, threshold=-1.0,
                         criterion="tiled_l2")
    far = v_far(adapter, ["a red circle"])[0]
    assert not far.copying and far.passed  # nothing is closer than -1
    # the margin: no copy (distance above the threshold) but within margin x threshold fails
    d1 = EditVerifier(index, seeds=1, seed=1001, num_inference_steps=3, threshold=-1.0,
                      criterion="tiled_l2")(adapter, ["a red circle"])[0].score
    assert d1 > 0
    near = EditVerifier(index, seeds=1, seed=1001, num_inference_steps=3, criterion="tiled_l2",
                        threshold=d1 / 2, margin=3.0)(adapter, ["a red circle"])[0]
    assert not near.copying and not near.passed
    # the pool: the seed whose generation is the indexed image comes first
    picker = EditVerifier(index, seeds=1, seed=998, pool=4, num_inference_steps=3,
                          criterion="tiled_l2", confirm=0)
    assert picker.select_seeds(adapter, ["a red circle"]) == [[1000]]
    assert picker.generated == 4
    assert picker(adapter, ["a red circle"], seeds=[[1000]])[0].copying
    # confirmation: the rest of the pool, closest first, checked only after a pass
    conf = EditVerifier(index, seeds=1, seed=998, pool=4, num_inference_steps=3,
                        criterion="tiled_l2")
    ranked = conf.select_seeds(adapter, ["a red circle"])[0]
    assert conf.confirm == 3 and len(ranked) == 4 and ranked[0] == 1000
    assert sorted(ranked) == [998, 999, 1000, 1001]
    before = conf.generated
    fast = conf(adapter, ["a red circle"], seeds=[ranked])[0]  # copies at once: no confirmation
    assert fast.copying and not fast.passed and fast.generations == 1
    assert conf.generated == before + 1
    late = conf(adapter, ["a red circle"], seeds=[[999, 1000]])[0]  # passes 999, copies on 1000
    assert late.generations == 2 and late.copies == 1 and not late.passed
    assert late.score < 0.15  # the closest of both stages
    with pytest.raises(ConfigError, match="confirm"):
        EditVerifier(index, confirm=-1)
    # an SSCD index is expected for a model that is not a testbed
    with pytest.raises(ConfigError, match="expects a sscd_cosine index"):
        EditVerifier(index, seeds=1)(adapter, ["x"])
    with pytest.raises(ConfigError):
        EditVerifier(index, seeds=0)
    with pytest.raises(ConfigError, match="margin"):
        EditVerifier(index, margin=0.5)

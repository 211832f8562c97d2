"""One call that explains a prompt: attribution, edit suggestions and, optionally, attention maps.

Combines Wen et al. (ICLR 2024) Sec. 3.3 token attribution and Sec. 3.1 detection (for the edit
suggestions) with Ren et al. (ECCV 2024) cross-attention shares and heat maps over one generated
image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffmem.core.sampling import sample, seeded_generators
from diffmem.detect import Detector, NoiseMagnitude
from diffmem.detect.calibration import calibrated_threshold
from diffmem.detect.verdict import CopyVerdict, GenerationJudge
from diffmem.explain._ablation import DEFAULT_ABLATION, attribute_with_ablation
from diffmem.explain._attention import AttentionShare, word_maps, word_shares
from diffmem.explain._attribution import TokenAttribution, TokenAttributor
from diffmem.explain._edits import EditReport, suggest_edits, verify_edits
from diffmem.explain._verify import EditVerifier
from diffmem.models.adapter import load_adapter, require_text
from diffmem.runtime.defaults import SAMPLING

__all__ = ["AttentionView", "Explanation", "explain_prompt"]


@dataclass(frozen=True)
class AttentionView:
    """The generated image with each word's attention share and heat map (Ren et al. 2024)."""

    image: np.ndarray  # (H, W, 3) uint8
    shares: np.ndarray  # (n_words,) share of the prompt tokens' attention, sums to 1
    maps: np.ndarray  # (n_words, H, W) in [0, 1]
    seed: int


@dataclass(frozen=True)
class Explanation:
    """What :func:`explain_prompt` returns."""

    attribution: TokenAttribution
    edits: EditReport
    attention: AttentionView | None = None
    #: the verdict by generation (with an index); None: the first-step estimate decides
    verdict: CopyVerdict | None = None

    def to_dict(self) -> dict:
        e = self.edits
        out = {**self.attribution.to_dict(), "detection": {
            "source": "generation" if self.verdict is not None else "first_step_estimate",
            "flagged": e.flagged, "score": e.score, "threshold": e.threshold,
            "estimate": {"score": e.score, "threshold": e.threshold,
                         "flagged": e.estimate_flagged}},
            "suggestions": [s.to_dict() for s in e.suggestions]}
        if self.verdict is not None:
            out["verdict"] = self.verdict.to_dict()
        if self.attention is not None:
            out["attention_shares"] = [round(float(s), 6) for s in self.attention.shares]
        return out


def explain_prompt(model, prompt: str, *, steps: int = 1, seeds: int = 1, seed: int = 0,
                   top_k: int = 5, threshold: float | None = None,
                   detector: Detector | None = None, attention: bool = False,
                   num_inference_steps: int = SAMPLING.steps, guidance_scale: float = SAMPLING.guidance_scale,
                   combine: int = 5, ablation: float = DEFAULT_ABLATION,
                   verify=None, index=None) -> Explanation:
    """Explain why ``prompt`` may reproduce training data, and how to edit it.

    1. token attribution (Wen et al. Sec. 3.3) over ``seeds`` initial noises at the first ``steps``,
       blended with word ablation (weight ``ablation``; 0 = the gradient alone;
       :mod:`diffmem.explain._ablation`);
    2. edit suggestions for the top-``top_k`` words, re-scored with ``detector`` (default
       :class:`NoiseMagnitude` with matching seeds) against ``threshold`` (default: the detector's
       ``threshold_``, fitted on the held-out prompts for a testbed model);
    3. with ``verify`` (an :class:`~diffmem.explain.EditVerifier` or the folder of the model's
       training-set index), the edits of a flagged prompt are generated and checked against the
       training set, and only an edit that copies nothing is suggested;
    4. with ``attention=True``, one generated image (seed ``seed``) with per-word attention shares
       and heat maps (Ren et al. 2024);
    5. with ``index`` (a :class:`~diffmem.detect.verdict.GenerationJudge` or the training-set
       index), the verdict "copies / does not copy" comes from generated previews searched in it
       (``Explanation.verdict``, with the closest preview and its nearest training image); the
       edits are made against that verdict, so a copying prompt with a low first-step score gets
       edits too (checked by generation when ``verify`` is given). The index is checked against
       the model first: another model's index is refused (ConfigError), never ignored.

    Example::

        exp = explain_prompt("testbed", "the zanzibar quixotic poster")
        print(format_terminal(exp))
    """
    adapter = load_adapter(model)
    require_text(adapter, "explain")
    judge = None
    if index is not None:
        judge = index if isinstance(index, GenerationJudge) else GenerationJudge(
            index, guidance_scale=guidance_scale)
        judge.check(adapter, who="explain --index")
    attributor = TokenAttributor(adapter, steps=steps, seeds=seeds, seed=seed,
                                 num_inference_steps=num_inference_steps,
                                 guidance_scale=guidance_scale)
    [attribution] = attributor.attribute([prompt])
    detector = detector or NoiseMagnitude(steps=1, generations=seeds, seed=seed,
                                          num_inference_steps=num_inference_steps,
                                          guidance_scale=guidance_scale)
    [attribution] = attribute_with_ablation(adapter, [attribution], detector=detector,
                                            weight=ablation)
    if threshold is None:  # fitted on the held-out prompts when the adapter is a testbed's
        threshold = calibrated_threshold(adapter, detector)
    [edits] = suggest_edits(adapter, [attribution], detector=detector, threshold=threshold,
                            top_k=top_k, combine=combine)
    verdict = None
    if judge is not None:
        [verdict] = judge(adapter, [prompt])
        edits = edits.against(verdict.copies)
    if verify is not None:
        verifier = verify if isinstance(verify, EditVerifier) else EditVerifier(
            verify, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        [edits] = verify_edits(adapter, [edits], verifier, extend=edit_extender(
            adapter, attributor, detector=detector, threshold=threshold, top_k=top_k,
            combine=combine, ablation=ablation))
    view = None
    if attention:
        view = attention_view(adapter, attribution, seed=seed,
                              num_inference_steps=num_inference_steps,
                              guidance_scale=guidance_scale)
    return Explanation(attribution, edits, view, verdict)


def edit_extender(adapter, attributor: TokenAttributor, *, detector: Detector,
                  threshold: float | None, top_k: int, combine: int, ablation: float):
    """``extend`` of :func:`verify_edits`: edited prompts -> their own attribution (the same
    attributor, detector and ablation weight) and edit suggestions."""

    def extend(prompts: list[str]) -> list[EditReport]:
        attributions = attribute_with_ablation(adapter, attributor.attribute(prompts),
                                               detector=detector, weight=ablation)
        return suggest_edits(adapter, attributions, detector=detector, threshold=threshold,
                             top_k=top_k, combine=combine)

    return extend


def attention_view(model, attribution: TokenAttribution, *, seed: int = 0,
                   num_inference_steps: int = SAMPLING.steps,
                   guidance_scale: float = SAMPLING.guidance_scale) -> AttentionView:
    """Generate one image of the prompt while collecting attention shares and maps per word."""
    adapter = load_adapter(model)
    require_text(adapter, "explain")
    hook = AttentionShare(maps=True)
    res = sample(adapter, [attribution.prompt], num_inference_steps=num_inference_steps,
                 guidance_scale=guidance_scale, generator=seeded_generators([seed]),
                 hooks=[hook])
    record = res.records[hook.name]
    with torch.no_grad():
        image = np.asarray(res.pil()[0])
    words = attribution.word_info
    return AttentionView(image, word_shares(record.share[0], words),
                         word_maps(record.maps[0], words, image.shape[:2]), seed)

"""Explaining memorization: which words of a prompt drive it, where they attend, how to edit them.

- :class:`TokenAttributor` / :class:`TokenAttribution`: Wen et al. (ICLR 2024) Sec. 3.3 token
  attribution by the gradient of the text-conditional noise magnitude;
  :func:`attribute_with_ablation` blends it with word ablation (what ``explain`` shows).
- :class:`AttentionShare`: each token's share of cross-attention and its heat map (Ren et al.,
  ECCV 2024).
- :func:`suggest_edits`: variants without the top words, re-scored by the detector.
- :func:`explain_prompt` + :func:`format_terminal` / :func:`to_html`: all of it for one prompt.
"""

from diffmem.detect.calibration import calibrated_threshold as calibrate_threshold
from diffmem.explain._ablation import (
    DEFAULT_ABLATION,
    attribute_with_ablation,
    blend_attributions,
    word_ablation,
)
from diffmem.explain._attention import AttentionRecord, AttentionShare, word_maps, word_shares
from diffmem.explain._attribution import TokenAttribution, TokenAttributor, noise_magnitude_gradient
from diffmem.explain._edits import (
    EditReport,
    EditSuggestion,
    suggest_edits,
    verify_edits,
)
from diffmem.explain._explain import AttentionView, Explanation, attention_view, explain_prompt
from diffmem.explain._render import format_terminal, to_html, use_color
from diffmem.explain._verify import EditVerifier, Verdict
from diffmem.explain._words import Word, prompt_words

__all__ = [
    "DEFAULT_ABLATION",
    "AttentionRecord",
    "AttentionShare",
    "AttentionView",
    "EditReport",
    "EditSuggestion",
    "EditVerifier",
    "Explanation",
    "TokenAttribution",
    "TokenAttributor",
    "Verdict",
    "Word",
    "attention_view",
    "attribute_with_ablation",
    "blend_attributions",
    "calibrate_threshold",
    "explain_prompt",
    "format_terminal",
    "noise_magnitude_gradient",
    "prompt_words",
    "suggest_edits",
    "to_html",
    "use_color",
    "verify_edits",
    "word_ablation",
    "word_maps",
    "word_shares",
]

"""Presenting explanations: coloured terminal text, a self-contained HTML page, PNG figures."""

from __future__ import annotations

import base64
import html
import io
import os
import sys
from typing import TextIO

import numpy as np

from diffmem.explain._explain import Explanation

__all__ = ["format_terminal", "to_html", "use_color"]

#: xterm-256 colours from cold to hot; a word's colour is picked by its score relative to the top.
_RAMP = (250, 229, 221, 214, 208, 202, 196)


def use_color(stream: TextIO | None = None) -> bool:
    """ANSI colour only on a terminal and when ``NO_COLOR`` is unset or empty (no-color.org)."""
    stream = stream or sys.stdout
    if os.environ.get("NO_COLOR"):
        return False
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def _paint(text: str, rel: float) -> str:
    code = _RAMP[min(int(rel * (len(_RAMP) - 1) + 0.5), len(_RAMP) - 1)]
    bold = "1;" if rel >= 0.999 else ""
    return f"\033[{bold}38;5;{code}m{text}\033[0m"


def _coloured_prompt(exp: Explanation, color: bool) -> str:
    a = exp.attribution
    top = float(a.scores.max()) if len(a.scores) else 0.0
    if color:
        return " ".join(_paint(w, float(s) / top if top > 0 else 0.0)
                        for w, s in zip(a.words, a.scores, strict=True))
    return " ".join(f"{w}[{100 * s:.0f}%]" for w, s in zip(a.words, a.scores, strict=True))


def format_terminal(exp: Explanation, *, color: bool | None = None, top_k: int = 3) -> str:
    """The prompt with words coloured by attribution, the top words and the edit suggestions.

    ``color=None`` decides with :func:`use_color` (plain text when not a TTY or NO_COLOR is set);
    plain text shows each word's score as a percentage in brackets.
    """
    color = use_color() if color is None else color
    a, e = exp.attribution, exp.edits
    lines = [_coloured_prompt(exp, color)]
    if a.truncated:
        lines.append("note: the prompt is longer than the text encoder's context; only the "
                     "kept tokens are explained")
    tops = ", ".join(f"{w} {100 * s:.0f}%" for w, s in a.top(top_k, editable=True))
    lines.append(f"top words: {tops}")
    lines += _verdict_lines(exp)
    if e.recommended is not None:
        m = e.recommended
        checked = (f", generated {m.generations}x: no copy of a training image"
                   if m.copies is not None else "")
        lines.append(f"suggested edit: {m.describe()}: {m.prompt!r} ({m.score:.3f}{checked})")
    elif e.flagged and e.checked:
        lines.append("no suggested edit: no generated edit passed the check (each copied, or "
                     "came near, a training image)")
    if e.minimal is not None and e.minimal is not e.recommended:
        m = e.minimal
        lines.append(f"smallest edit that clears it: {m.describe()}: {m.prompt!r} ({m.score:.3f})")
    if e.suggestions:
        header = "edits (lowest score first):"
        if e.flagged is False:
            header = "edits (the prompt is not flagged; scores shown for reference only):"
        lines.append(header)
        for s in e.suggestions:
            mark = "" if s.clears is None else ("  ok" if s.clears else "  still flagged")
            if s.copies is not None:
                mark += f", copies {s.copies}/{s.generations}"
            lines.append(f"  {s.score:7.3f}{mark:15s} {s.describe()}: {s.prompt!r}")
    else:
        lines.append("no edit suggestions (no editable words)")
    return "\n".join(lines)


def _verdict_lines(exp: Explanation) -> list[str]:
    """The verdict (by generation, with an index) and the first-step estimate, each labelled."""
    from diffmem.detect.verdict import ESTIMATE_NOTE

    e, v = exp.edits, exp.verdict
    est = ""
    if e.threshold is not None:
        est = (f" > threshold {e.threshold:.3f}" if e.estimate_flagged
               else f" <= threshold {e.threshold:.3f}")
    if v is None:
        word = {True: ": flagged", False: ": not flagged", None: ""}[e.estimate_flagged]
        return [f"first-step estimate: noise magnitude {e.score:.3f}{est}{word}",
                f"note: {ESTIMATE_NOTE}"]
    lines = [f"verdict by generation ({v.method()}): "
             + ("COPIES a training image" if v.copies else "copies no training image"),
             f"  closest preview (seed {v.seed}) vs training image {v.nearest_id} "
             f"{v.nearest_caption!r}: {v.criterion_text()}"]
    if e.threshold is not None:
        agree = "agrees" if e.estimate_flagged == v.copies else "disagrees; the verdict decides"
        lines.append(f"first-step estimate (fast, not the verdict): noise magnitude "
                     f"{e.score:.3f}{est} ({agree})")
    if not v.copies:
        lines.append("the previews copy no training image: no edit is needed")
    return lines


def _png(arr_or_fig) -> str:
    """Base64 PNG of a uint8 image array or a matplotlib figure."""
    buf = io.BytesIO()
    if isinstance(arr_or_fig, np.ndarray):
        from PIL import Image

        Image.fromarray(arr_or_fig).save(buf, format="PNG")
    else:  # a Figure (TokenAttribution.plot makes them without pyplot: nothing to close)
        arr_or_fig.savefig(buf, format="PNG", dpi=110)
    return base64.b64encode(buf.getvalue()).decode("ascii")


#: Colour map of the attention heat maps (perceptually uniform, readable in greyscale print).
HEAT_CMAP = "inferno"


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """``heat`` (H, W) in [0, 1] through :data:`HEAT_CMAP`, blended over ``image`` (H, W, 3)
    turned grey (and lightened), so that the colours on the picture are the map's alone."""
    import matplotlib

    grey = image[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    grey = 64 + 0.5 * grey  # lightened: the map stays readable over dark pixels
    base = np.repeat(grey[..., None], 3, axis=2)
    rgb = matplotlib.colormaps[HEAT_CMAP](heat)[..., :3] * 255
    weight = alpha * heat[..., None] ** 0.5  # cold regions show the grey picture through
    return (base * (1 - weight) + rgb * weight).clip(0, 255).astype(np.uint8)


def colour_bar(label: str = "attention of the word, scaled per word (0 = its least, "
                            "1 = its most)") -> object:
    """A horizontal colour bar of :data:`HEAT_CMAP` from 0 to 1 (a matplotlib Figure)."""
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 0.85), dpi=100)
    ax = fig.add_axes((0.05, 0.55, 0.9, 0.25))
    fig.colorbar(ScalarMappable(Normalize(0, 1), matplotlib.colormaps[HEAT_CMAP]), cax=ax,
                 orientation="horizontal", label=label)
    ax.xaxis.label.set_fontsize(8)
    ax.tick_params(labelsize=8)
    return fig


def _upscale(image: np.ndarray, min_side: int = 192) -> np.ndarray:
    """Nearest-neighbour upscaling so that small images (the testbed's 64 px) stay visible."""
    factor = max(1, min_side // max(image.shape[0], 1))
    return image.repeat(factor, 0).repeat(factor, 1)


def to_html(exp: Explanation) -> str:
    """A self-contained HTML page (base64 PNGs): coloured prompt, scores, suggestions, the
    generated image and each word's attention heat map."""
    a, e = exp.attribution, exp.edits
    top = float(a.scores.max()) if len(a.scores) else 1.0
    spans = " ".join(
        f'<span style="background: rgba(220,30,30,{0.1 + 0.8 * float(s) / top:.2f})" '
        f'title="{100 * s:.1f}%">{html.escape(w)}</span>'
        for w, s in zip(a.words, a.scores, strict=True))
    rows = "".join(
        f"<tr><td>{s.score:.3f}</td><td>{'' if s.clears is None else ('yes' if s.clears else 'no')}"
        f"</td><td>{'' if s.copies is None else f'{s.copies}/{s.generations}'}"
        f"</td><td>{html.escape(s.describe())}</td><td>{html.escape(s.prompt)}</td></tr>"
        for s in e.suggestions)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>diffmem explain</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "figure{display:inline-block;margin:.3em;text-align:center}"
        "td,th{padding:.2em .6em;text-align:left}.prompt{font-size:1.4em}</style></head><body>",
        f"<h1>Why this prompt may reproduce training data</h1><p class='prompt'>{spans}</p>",
        _verdict_html(exp),
        f"<img alt='attribution' src='data:image/png;base64,{_png(a.plot())}'>",
        "<h2>Suggested edits</h2><table><tr><th>score</th><th>clears</th><th>copies</th><th>edit</th>"
        f"<th>prompt</th></tr>{rows}</table>",
    ]
    if exp.attention is not None:
        parts.append(_attention_html(exp))
    parts.append("</body></html>")
    return "\n".join(parts)


def _verdict_html(exp: Explanation) -> str:
    """The verdict with its evidence (the closest preview beside its nearest training image, the
    similarity and the criterion), and the first-step estimate, labelled as such."""
    e, v = exp.edits, exp.verdict
    est = f"first-step estimate (fast, not the verdict): noise magnitude {e.score:.3f}"
    if e.threshold is not None:
        est += (f" {'>' if e.estimate_flagged else '&le;'} threshold {e.threshold:.3f} "
                f"({'flagged' if e.estimate_flagged else 'not flagged'})")
    if v is None:
        from diffmem.detect.verdict import ESTIMATE_NOTE

        return f"<p class='estimate'>{est}</p><p class='note'>{html.escape(ESTIMATE_NOTE)}</p>"
    head = "copies a training image" if v.copies else "copies no training image"
    figs = ""
    if v.preview is not None:
        figs += (f"<figure><img class='preview' alt='closest preview' "
                 f"src='data:image/png;base64,{_png(_upscale(v.preview))}'>"
                 f"<figcaption>closest preview (seed {v.seed})</figcaption></figure>")
    if v.nearest is not None:
        figs += (f"<figure><img class='nearest' alt='nearest training image' "
                 f"src='data:image/png;base64,{_png(_upscale(v.nearest))}'>"
                 f"<figcaption>nearest training image {html.escape(v.nearest_id)}: "
                 f"&ldquo;{html.escape(v.nearest_caption)}&rdquo;</figcaption></figure>")
    return (f"<h2 class='verdict' data-copies='{str(v.copies).lower()}'>Verdict by generation: "
            f"{head}</h2><p>{html.escape(v.method())}; closest preview: "
            f"{html.escape(v.criterion_text())} (copy criterion: {html.escape(v.criterion)} "
            f"{'&gt;' if v.higher_is_better else '&lt;'} {v.copy_threshold:g})</p>"
            f"<div class='evidence'>{figs}</div><p class='estimate'>{est}</p>")


def _attention_html(exp: Explanation) -> str:
    view = exp.attention
    figs = [f"<figure><img src='data:image/png;base64,{_png(_upscale(view.image))}'>"
            f"<figcaption>generated (seed {view.seed})</figcaption></figure>"]
    for w, share, heat in zip(exp.attribution.words, view.shares, view.maps, strict=True):
        img = _upscale(overlay(view.image, heat))
        figs.append(f"<figure><img src='data:image/png;base64,{_png(img)}'>"
                    f"<figcaption>{html.escape(w)} ({100 * share:.0f}% attention)</figcaption>"
                    "</figure>")
    bar = f"<p><img alt='colour bar' src='data:image/png;base64,{_png(colour_bar())}'></p>"
    return ("<h2>Cross-attention per word (Ren et al. 2024)</h2>"
            "<p>Where each word looks in the generated image: the heat map over the image in grey; "
            "the percentage is the word's share of the prompt's attention.</p>"
            + "".join(figs) + bar)

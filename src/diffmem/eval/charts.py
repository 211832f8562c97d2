"""Line charts as text: Mermaid ``xychart-beta`` blocks, which Markdown viewers that render
Mermaid (GitHub, GitLab, many editors) draw as charts. The documentation keeps no images, so its
plots are these blocks, printed by the commands that also draw PNG plots (``eval dose``, ``eval
recovery-plot``, the training benchmark's ``report.md``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def mermaid_line_chart(lines: Mapping[str, Sequence[float | None]], xs: Sequence, *,
                       title: str, x_label: str, y_label: str,
                       y_range: tuple[float, float] = (0.0, 1.0)) -> str:
    """A Mermaid ``xychart-beta`` block: one line per entry of ``lines`` (its values at ``xs``).

    Mermaid's xychart has no legend: the title and a comment name the lines in order (separated
    by semicolons). A line with a missing value (``None``) is left out and named in the comment."""
    drawn = [n for n, ys in lines.items() if all(y is not None for y in ys)]
    left = [n for n in lines if n not in drawn]
    out = ["```mermaid", "xychart-beta",
           f'    title "{title} (lines: {"; ".join(drawn)})"',
           f"    %% lines in order: {'; '.join(drawn)}"
           + (f" (left out, a missing value: {'; '.join(left)})" if left else ""),
           f'    x-axis "{x_label}" [' + ", ".join(str(x) for x in xs) + "]",
           f'    y-axis "{y_label}" {y_range[0]:g} --> {y_range[1]:g}']
    out += ["    line [" + ", ".join(f"{y:.3f}" for y in lines[n]) + "]" for n in drawn]
    out.append("```")
    return "\n".join(out)

"""Table and plot of several recovery reports (:func:`diffmem.eval.recovery.evaluate_recovery`):
one row / one line per configuration (model x mitigation)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def recovery_table(reports: Mapping[str, Mapping]) -> str:
    """A Markdown table: items, share recoverable within the budget, at the start and at the end,
    the median iterations to the first recovery."""
    head = ("| configuration | items | recoverable (within budget) | copies at start | "
            "copies at end | median iterations to recovery | budget |\n"
            "|---|---|---|---|---|---|---|\n")
    rows = []
    for name, r in reports.items():
        med = r.get("iterations_to_recovery_median")
        rows.append(f"| {name} | {r['n_items']} | {r['recovered_share']:.3f} | "
                    f"{r['recovered_at_start']:.3f} | {r['recovered_at_end']:.3f} | "
                    f"{'-' if med is None else f'{med:g}'} | {r['budget']} |")
    return head + "\n".join(rows) + "\n"


def _curves(reports: Mapping[str, Mapping]) -> tuple[list[int], dict[str, list[float]]]:
    """The checked iterations (and budgets) of all reports, and each report's share of items
    recovered by each of them (cumulative: a run that stopped early keeps its last value)."""
    its = sorted({c["iteration"] for r in reports.values() for c in r["curve"]}
                 | {r["budget"] for r in reports.values()})
    return its, {name: [max((c["share_recovered_by"] for c in r["curve"] if c["iteration"] <= i),
                            default=0.0) for i in its] for name, r in reports.items()}


def recovery_curve_table(reports: Mapping[str, Mapping]) -> str:
    """The plot as a Markdown table: share of items recovered by each checked iteration (a run
    that stopped early keeps its last value)."""
    its, curves = _curves(reports)
    out = ("| configuration | " + " | ".join(str(i) for i in its) + " |\n|---|"
           + "---|" * len(its) + "\n")
    for name, cells in curves.items():
        out += f"| {name} | " + " | ".join(f"{v:.2f}" for v in cells) + " |\n"
    return out


def recovery_chart(reports: Mapping[str, Mapping]) -> str:
    """The plot as text: a Mermaid line chart (:func:`~diffmem.eval.charts.mermaid_line_chart`)
    of the share recovered by iteration, one line per configuration."""
    from diffmem.eval.charts import mermaid_line_chart

    its, curves = _curves(reports)
    return mermaid_line_chart(curves, its, title="recovery by text-embedding search",
                              x_label="optimisation iterations", y_label="share recovered")


def plot_recovery(reports: Mapping[str, Mapping], path: str | Path, *, title: str = "") -> Path:
    """Save the share of items recovered by iteration i (cumulative), one line per configuration;
    a run that stopped early (every item recovered) is drawn flat to its budget."""
    from matplotlib.figure import Figure  # no pyplot: the user's backend is left alone

    from diffmem.eval.dose import _colours

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    for (name, r), colour in zip(reports.items(), _colours(len(reports)), strict=True):
        xs = [c["iteration"] for c in r["curve"]]
        ys = [c["share_recovered_by"] for c in r["curve"]]
        if xs and xs[-1] < r["budget"]:
            xs, ys = [*xs, r["budget"]], [*ys, ys[-1]]
        ax.plot(xs, ys, "o-", color=colour, label=name, markersize=3)
    ax.set(xlabel="optimisation iterations", ylabel="share of memorized items recovered",
           ylim=(-0.02, 1.02), title=title or "recovery by text-embedding search")
    ax.grid(True, linewidth=0.3)
    if reports:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path

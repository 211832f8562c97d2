"""The training benchmark's report (:mod:`diffmem.train.bench`): the table of its rows, the bar
chart (``chart.png``) and the markdown report (``report.md``)."""

from __future__ import annotations

import json
from pathlib import Path


def _table(rows: dict) -> list[dict]:
    plain = rows.get("plain")
    out = []
    for name, r in rows.items():
        sec = r.get("seconds_training")
        total = None if sec is None else sec + r.get("seconds_dedup", 0.0)
        rec = {"method": name, "planted_memorization": r["planted_memorization_rate"],
               "heldout_alignment": r["heldout_alignment"], "heldout_fpd": r["heldout_fpd"],
               "seconds": total}
        if plain is not None and total is not None:
            p_total = plain["seconds_training"] + plain.get("seconds_dedup", 0.0)
            rec["time_vs_plain"] = total / p_total  # unrounded: the report rounds once
            if plain["heldout_fpd"]:
                rec["fpd_vs_plain"] = r["heldout_fpd"] / plain["heldout_fpd"]
        if r.get("samples"):
            rec["dropped_share"] = round(r.get("samples_dropped", 0) / r["samples"], 4)
        out.append(rec)
    return out


def plot_benchmark(report: dict | str | Path, path: str | Path) -> Path:
    """Bar chart: planted memorization, held-out alignment, FPD and time vs plain per method."""
    from matplotlib.figure import Figure  # no pyplot: a user's backend is left alone

    if not isinstance(report, dict):
        report = json.loads(Path(report).read_text())
    table = report["table"]
    names = [r["method"].replace(" (no fine-tune)", "\n(no FT)") for r in table]
    panels = [("planted_memorization", "planted memorization rate"),
              ("heldout_alignment", "held-out alignment (probe)"),
              ("heldout_fpd", "held-out FPD (lower = better)"),
              ("time_vs_plain", "training time / plain")]
    fig = Figure(figsize=(18, 4))
    axes = fig.subplots(1, 4)
    for ax, (key, title) in zip(axes, panels, strict=True):
        vals = [r.get(key) if r.get(key) is not None else 0.0 for r in table]
        ax.bar(range(len(vals)), vals, color=["gray" if "no FT" in n else "tab:blue"
                                              for n in names])
        ax.set_xticks(range(len(vals)), names, rotation=60, fontsize=8)
        ax.set_title(title, fontsize=10)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def markdown_report(report: dict, *, width: int = 30) -> str:
    """The benchmark's table and a text bar chart of the planted memorization rate (markdown)."""
    table = report["table"]
    lines = ["| method | planted memorization | held-out alignment | held-out FPD | FPD vs plain | "
             "time vs plain | samples dropped |", "|---|---|---|---|---|---|---|"]

    def f(v, nd=3):
        return "-" if v is None else f"{v:.{nd}f}"

    for r in table:
        lines.append(f"| {r['method']} | {f(r['planted_memorization'])} | "
                     f"{f(r['heldout_alignment'])} | {f(r['heldout_fpd'], 1)} | "
                     f"{f(r.get('fpd_vs_plain'), 2)} | {f(r.get('time_vs_plain'), 2)} | "
                     f"{f(r.get('dropped_share'), 3)} |")
    lines += ["", f"Planted memorization rate (each block = 1/{width}):", "", "```"]
    name_w = max(len(r["method"]) for r in table)
    for r in table:
        v = r["planted_memorization"]
        bar = "█" * round(v * width)
        lines.append(f"{r['method']:<{name_w}} |{bar:<{width}}| {v:.3f}")
    lines.append("```")
    if report.get("dose"):
        lines += ["", "Planted memorization rate by the planted image's copies:", "",
                  report["dose"]]
        if report.get("dose_chart"):
            lines += ["", report["dose_chart"]]
    return "\n".join(lines) + "\n"

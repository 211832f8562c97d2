"""Dose-response of memorization: how the share of generations that copy a training image grows with
the number of training copies of that image (the graded testbed, ``testbed-graded``; the function
behind ``diffmem eval dose``).

Input: rows of a labels file (``diffmem testbed label --model testbed-graded``, one per prompt),
each with ``duplicates`` (training copies of the item the prompt was derived from; 0 for the clean
controls) and its generations' outcome, one of

- ``copied``: a copy flag per generation (e.g. a mitigation's generations, judged image by image);
- ``copies`` and ``seeds``: how many of ``seeds`` generations copied (what the labels store);

or per-generation flags given beside the rows (``flags``). Where a row also has ``distances``,
``nearest``, ``threshold`` and ``source`` (the labels do), ``own_copy_rate`` counts only copies of
the prompt's own training image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from diffmem.runtime.errors import PromptError


def _flags(row: Mapping, given: Sequence[bool] | None) -> np.ndarray:
    if given is not None:
        return np.asarray(given, bool)
    if "copied" in row:
        return np.asarray(row["copied"], bool)
    if "copies" in row and "seeds" in row:
        n, k = int(row["seeds"]), int(row["copies"])
        if not 0 <= k <= n:
            raise PromptError(f"row {row.get('prompt')!r}: copies {k} of {n} seeds")
        return np.arange(n) < k
    raise PromptError(f"row {row.get('prompt')!r} has no copy outcome (a 'copied' list, or "
                      "'copies' and 'seeds')")


def _own(row: Mapping) -> np.ndarray | None:
    """Per generation: a copy of the prompt's own training image (``None``: not recorded)."""
    if not all(k in row for k in ("distances", "nearest", "threshold", "source")):
        return None
    d = np.asarray(row["distances"], float)
    return (d < float(row["threshold"])) & (np.asarray(row["nearest"]) == row["source"])


def _summary(flags: list[np.ndarray], own: list[np.ndarray | None]) -> dict:
    n_gen = int(sum(f.size for f in flags))
    n_copies = int(sum(f.sum() for f in flags))
    out = {"n_prompts": len(flags), "n_generations": n_gen, "n_copies": n_copies,
           "copy_rate": n_copies / n_gen if n_gen else float("nan"),
           "prompt_copy_rate": float(np.mean([f.any() for f in flags])) if flags else float("nan")}
    if own and all(o is not None for o in own):
        n_own = sum(int(o.sum()) for o in own if o is not None)
        out["own_copy_rate"] = n_own / n_gen if n_gen else float("nan")
    return out


def dose_response(rows: Sequence[Mapping], flags: Sequence[Sequence[bool]] | None = None
                  ) -> list[dict]:
    """One row per duplicate count (ascending; rows with ``duplicates`` 0, the clean controls, are
    left out): ``duplicates``, ``n_prompts``, ``n_generations``, ``n_copies``, ``copy_rate`` (share
    of generations that copy), ``prompt_copy_rate`` (share of prompts with at least one copy) and,
    where recorded, ``own_copy_rate``. ``flags``: per-generation copy flags, one sequence per row
    (instead of the rows' own outcome)."""
    if flags is not None and len(flags) != len(rows):
        raise PromptError(f"{len(flags)} flag lists for {len(rows)} rows")
    by: dict[int, tuple[list, list]] = {}
    for i, row in enumerate(rows):
        if row.get("duplicates") is None:
            raise PromptError(f"row {row.get('prompt')!r} has no 'duplicates' (training copies); "
                              "label the graded testbed: `diffmem testbed label --model "
                              "testbed-graded`")
        dup = int(row["duplicates"])
        if dup <= 0:
            continue
        f, o = by.setdefault(dup, ([], []))
        f.append(_flags(row, None if flags is None else flags[i]))
        o.append(_own(row))
    return [{"duplicates": d, **_summary(*by[d])} for d in sorted(by)]


def dose_report(rows: Sequence[Mapping], flags: Sequence[Sequence[bool]] | None = None) -> dict:
    """:func:`dose_response` over all rows (``counts``), per group (``groups``, for rows with a
    ``group``) and the clean controls' copy rate as the baseline (``clean``: rows with
    ``duplicates`` 0)."""
    flags = list(flags) if flags is not None else None
    report: dict = {"n_rows": len(rows), "counts": dose_response(rows, flags)}
    groups = dict.fromkeys(r["group"] for r in rows if r.get("group") not in (None, "clean"))
    if groups:
        report["groups"] = {}
        for g in groups:
            keep = [i for i, r in enumerate(rows) if r.get("group") == g]
            report["groups"][g] = dose_response([rows[i] for i in keep],
                                                None if flags is None else [flags[i] for i in keep])
    clean = [i for i, r in enumerate(rows) if int(r.get("duplicates") or 0) == 0]
    if clean:
        report["clean"] = _summary([_flags(rows[i], None if flags is None else flags[i])
                                    for i in clean], [])
    return report


def dose_table(rows_by_method: Mapping[str, Sequence[Mapping]], *, key: str = "copy_rate"
               ) -> str:
    """The plot of :func:`plot_dose_response` as a Markdown table: one row per duplicate count,
    one column per method (``key`` of each :func:`dose_response` row; "–" where a method has
    no prompt of that count)."""
    names = list(rows_by_method)
    by = {n: {r["duplicates"]: r for r in rows} for n, rows in rows_by_method.items()}
    counts = sorted({d for rows in by.values() for d in rows})
    lines = ["| duplicates | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for d in counts:
        cells = [f"{by[n][d][key]:.3f}" if d in by[n] and key in by[n][d] else "–" for n in names]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def dose_chart(rows_by_method: Mapping[str, Sequence[Mapping]], *, key: str = "copy_rate",
               title: str = "copy rate by duplicate count") -> str:
    """The plot of :func:`plot_dose_response` as text: a Mermaid line chart
    (:func:`~diffmem.eval.charts.mermaid_line_chart`), x = duplicate count, one line per method
    (a method without a value at every count is left out and named)."""
    from diffmem.eval.charts import mermaid_line_chart

    by = {n: {r["duplicates"]: r.get(key) for r in rows} for n, rows in rows_by_method.items()}
    counts = sorted({d for rows in by.values() for d in rows})
    return mermaid_line_chart({n: [by[n].get(d) for d in counts] for n in by}, counts,
                              title=title, x_label="duplicates", y_label=key.replace("_", " "))


def plot_dose_response(rows_by_method: Mapping[str, Sequence[Mapping]], path: str | Path, *,
                       key: str = "copy_rate", title: str = "",
                       baselines: Mapping[str, float] | None = None) -> Path:
    """Save copy rate (``key`` of :func:`dose_response` rows) against duplicate count, log x axis,
    one line per method; ``baselines``: a method's clean-control copy rate, drawn dashed."""
    from matplotlib.figure import Figure  # no pyplot: the user's backend is left alone

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    counts: set[int] = set()
    for (name, rows), colour in zip(rows_by_method.items(), _colours(len(rows_by_method)),
                                    strict=True):
        pts = [(r["duplicates"], r[key]) for r in rows if key in r]
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        counts.update(xs)
        ax.plot(xs, ys, "o-", color=colour, label=name)
        if baselines and name in baselines:
            ax.axhline(baselines[name], color=colour, linestyle="--", linewidth=0.8)
    ax.set_xscale("log", base=2)
    if counts:
        ax.set_xticks(sorted(counts), [str(c) for c in sorted(counts)])
    ax.set(xlabel="training copies of the image", ylabel=key.replace("_", " "), ylim=(-0.02, 1.02),
           title=title or "copy rate vs. duplicate count")
    ax.grid(True, linewidth=0.3)
    if rows_by_method:
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _colours(n: int) -> list[str]:
    base = ["tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:brown",
            "tab:pink", "tab:gray", "tab:olive", "tab:cyan"]
    return [base[i % len(base)] for i in range(n)]

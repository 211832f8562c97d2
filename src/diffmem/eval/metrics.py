"""Ranking metrics of a detector's scores, following scikit-learn's conventions.

Every function takes ``(y_true, y_score)``: ``y_true`` holds binary labels (1 = memorized, the
positive class), ``y_score`` any real scores where higher means "more likely positive". Degenerate
input (all labels of one class) makes ROC quantities undefined: the functions then warn with
:class:`UndefinedMetricWarning` and return NaN, as ``sklearn.metrics`` does, rather than raise.

Notation:
    P, N        numbers of positive and negative labels
    TPR(s)      fraction of positives with score >= s           (recall at threshold s)
    FPR(s)      fraction of negatives with score >= s
    AUC         P(score(pos) > score(neg)) + 1/2 P(score(pos) = score(neg))   (Mann-Whitney U / PN)

TPR at a target FPR ``f`` uses the ROC point with the **largest FPR not above f** (``FPR <= f``)
and, among points with that FPR, the highest TPR. This is the conservative reading; Wen et al.
take the largest FPR strictly below ``f`` and Ren et al. the ROC point closest to ``f`` (see
``docs/detection.md``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for this input (for example all labels belong to one class)."""


def _check(y_true: Sequence, y_score: Sequence) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(y_score, dtype=float)
    if y.ndim != 1 or s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"y_true and y_score must be 1-D of equal length, got {y.shape} and "
                         f"{s.shape}")
    if y.dtype == bool:
        y = y.astype(int)
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must be binary (0/1 or bool)")
    if np.isnan(s).any():
        raise ValueError("y_score contains NaN")
    return y.astype(int), s


def _degenerate(y: np.ndarray, what: str) -> bool:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        only = "positive" if n_pos else "negative"
        warnings.warn(f"{what} is undefined: all {y.size} labels are {only}",
                      UndefinedMetricWarning, stacklevel=3)
        return True
    return False


def roc_curve(y_true: Sequence, y_score: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr, thresholds)``, one point per distinct score plus the origin.

    ``thresholds[0]`` is ``inf`` (nothing flagged); point ``i`` flags ``score >= thresholds[i]``.
    Returns NaN rates for degenerate labels (with a warning).
    """
    y, s = _check(y_true, y_score)
    degenerate = _degenerate(y, "the ROC curve")
    # 1. sort by decreasing score; ties share one ROC point (the last index of each tie group)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_group = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
    # 2. cumulative true and false positives at each distinct threshold
    tps = np.cumsum(y_sorted)[last_of_group]
    fps = (last_of_group + 1) - tps
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    thresholds = np.r_[np.inf, s_sorted[last_of_group]]
    # 3. normalise
    n_pos, n_neg = tps[-1], fps[-1]
    if degenerate:
        nan = np.full(tps.shape, np.nan)
        return (nan if n_neg == 0 else fps / n_neg), (nan if n_pos == 0 else tps / n_pos), \
            thresholds
    return fps / n_neg, tps / n_pos, thresholds


def roc_auc_score(y_true: Sequence, y_score: Sequence) -> float:
    """Area under the ROC curve (ties count one half); NaN with a warning for one-class labels."""
    y, s = _check(y_true, y_score)
    if _degenerate(y, "ROC AUC"):
        return float("nan")
    # Mann-Whitney: U = sum of ranks of positives - P(P+1)/2, with average ranks for ties
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size)
    s_sorted = s[order]
    starts = np.r_[0, np.nonzero(np.diff(s_sorted))[0] + 1]
    ends = np.r_[starts[1:], s.size]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + b + 1) / 2.0  # average of 1-based ranks a+1 .. b
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def tpr_at_fpr(y_true: Sequence, y_score: Sequence, fpr: float, *, strict: bool = False) -> float:
    """TPR at the ROC point with the largest FPR not above ``fpr`` (highest TPR at that FPR);
    ``strict=True``: the largest FPR strictly below ``fpr`` (Wen et al.'s reference code)."""
    return operating_point(y_true, y_score, fpr, strict=strict)[1]


def operating_point(y_true: Sequence, y_score: Sequence, fpr: float, *, strict: bool = False
                    ) -> tuple[float, float, float]:
    """``(FPR, TPR, threshold)`` of the ROC point that :func:`tpr_at_fpr` reads: a prompt is
    flagged when its score is ``>= threshold``."""
    if not 0 <= fpr <= 1:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    y, s = _check(y_true, y_score)
    nan = float("nan")
    if _degenerate(y, f"TPR at {fpr:g} FPR"):
        return nan, nan, nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        f, t, thr = roc_curve(y, s)
    ok = f < fpr - 1e-12 if strict else f <= fpr + 1e-12
    if not ok.any():  # strict with fpr = 0: no point qualifies
        return nan, nan, nan
    best_fpr = f[ok].max()
    at = np.flatnonzero(ok & (f == best_fpr))
    k = at[np.argmax(t[at])]
    return float(f[k]), float(t[k]), float(thr[k])


__all__ = ["UndefinedMetricWarning", "operating_point", "roc_auc_score", "roc_curve",
           "tpr_at_fpr"]

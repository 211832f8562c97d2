"""Ranking metrics against brute-force reference implementations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from diffmem.eval.metrics import UndefinedMetricWarning, roc_auc_score, roc_curve, tpr_at_fpr


def brute_auc(y, s):
    """P(pos > neg) + 1/2 P(pos = neg) over all pairs."""
    pos = [b for a, b in zip(y, s, strict=True) if a]
    neg = [b for a, b in zip(y, s, strict=True) if not a]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def brute_tpr_at_fpr(y, s, target):
    """Sweep every threshold (flag score >= t); keep the largest FPR <= target, best TPR there."""
    y = np.asarray(y, bool)
    best = (-1.0, 0.0)
    for t in [np.inf, *sorted(set(s))]:
        flag = np.asarray(s) >= t
        fpr = (flag & ~y).sum() / (~y).sum()
        tpr = (flag & y).sum() / y.sum()
        if fpr <= target and (fpr, tpr) > best:
            best = (fpr, tpr)
    return best[1]


def random_case(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 60))
    y = rng.random(n) < rng.uniform(0.2, 0.8)
    y[0], y[1] = True, False  # both classes present
    # rounded scores create ties, shifted positives create signal
    s = np.round(rng.normal(size=n) + y * rng.uniform(0, 2), int(rng.integers(0, 2)))
    return y.astype(int), s


@pytest.mark.parametrize("seed", range(40))
def test_auc_matches_brute_force(seed):
    y, s = random_case(seed)
    assert roc_auc_score(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("target", [0.0, 0.01, 0.03, 0.1, 0.25, 1.0])
def test_tpr_at_fpr_matches_brute_force(seed, target):
    y, s = random_case(seed)
    assert tpr_at_fpr(y, s, target) == pytest.approx(brute_tpr_at_fpr(y, s, target), abs=1e-12)


def test_known_values():
    # scikit-learn's roc_auc_score docstring example
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert roc_auc_score(y, s) == pytest.approx(0.75)
    fpr, tpr, thr = roc_curve(y, s)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    assert thr[0] == np.inf
    np.testing.assert_allclose(thr[1:], [0.8, 0.4, 0.35, 0.1])
    # at FPR <= 0.01 only the point (0, 0.5) is allowed; at FPR <= 0.5, (0.5, 1.0)
    assert tpr_at_fpr(y, s, 0.01) == 0.5
    assert tpr_at_fpr(y, s, 0.5) == 1.0


def test_perfect_and_reversed_ranking():
    y = [1, 1, 1, 0, 0, 0]
    s = [6, 5, 4, 3, 2, 1]
    assert roc_auc_score(y, s) == 1.0 and tpr_at_fpr(y, s, 0.01) == 1.0
    assert roc_auc_score(y, [-v for v in s]) == 0.0
    assert tpr_at_fpr(y, [-v for v in s], 0.01) == 0.0
    assert roc_auc_score(y, [1] * 6) == 0.5


def test_bool_labels_and_lists():
    assert roc_auc_score([True, False], [0.9, 0.1]) == 1.0


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0]])
def test_one_class_warns_and_returns_nan(labels):
    with pytest.warns(UndefinedMetricWarning, match="undefined"):
        assert np.isnan(roc_auc_score(labels, [0.1, 0.2, 0.3]))
    with pytest.warns(UndefinedMetricWarning):
        assert np.isnan(tpr_at_fpr(labels, [0.1, 0.2, 0.3], 0.01))
    with pytest.warns(UndefinedMetricWarning):
        fpr, tpr, _ = roc_curve(labels, [0.1, 0.2, 0.3])
    assert np.isnan(fpr).all() or np.isnan(tpr).all()


def test_bad_input_raises():
    with pytest.raises(ValueError, match="binary"):
        roc_auc_score([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="equal length"):
        roc_auc_score([0, 1], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc_score([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="fpr"):
        tpr_at_fpr([0, 1], [0.1, 0.2], 1.5)


def test_tpr_at_fpr_rule_and_strict_reading():
    from diffmem.eval.metrics import operating_point, tpr_at_fpr

    # 100 negatives 0..99, positives at 98.5 and 50.5: the top negative makes FPR exactly 1%
    y = [0] * 100 + [1, 1]
    s = [*range(100), 98.5, 50.5]
    assert tpr_at_fpr(y, s, 0.01) == 0.5  # FPR <= 1%: the point at threshold 98.5
    f, t, thr = operating_point(y, s, 0.01)
    assert f == 0.01 and t == 0.5 and thr == 98.5
    fs, ts, _ = operating_point(y, s, 0.01, strict=True)  # FPR < 1%: no negative passes
    assert fs == 0.0 and ts == 0.0 and tpr_at_fpr(y, s, 0.01, strict=True) == 0.0

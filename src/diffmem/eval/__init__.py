"""Evaluation: ranking metrics and the detection harness."""

from __future__ import annotations

from diffmem.eval.metrics import UndefinedMetricWarning, roc_auc_score, roc_curve, tpr_at_fpr

__all__ = ["UndefinedMetricWarning", "roc_auc_score", "roc_curve", "tpr_at_fpr"]

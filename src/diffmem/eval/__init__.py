"""Evaluation: ranking metrics, the detection harness, text alignment and image quality."""

from __future__ import annotations

from diffmem.eval.alignment import (
    AttributeAlignment,
    CLIPEncoder,
    CLIPScore,
    attribute_alignment,
    clip_score,
    load_clip,
)
from diffmem.eval.metrics import UndefinedMetricWarning, roc_auc_score, roc_curve, tpr_at_fpr
from diffmem.eval.probe import AttributeProbe, ProbeConfig, caption_pairs, load_probe, train_attribute_probe
from diffmem.eval.quality import (
    FrechetDistance,
    InceptionFeatures,
    ProbeFeatures,
    SSCDFeatures,
    fid,
    frechet_distance,
    fsd,
)

__all__ = [
    "AttributeAlignment",
    "AttributeProbe",
    "CLIPEncoder",
    "CLIPScore",
    "FrechetDistance",
    "InceptionFeatures",
    "ProbeConfig",
    "ProbeFeatures",
    "SSCDFeatures",
    "UndefinedMetricWarning",
    "attribute_alignment",
    "caption_pairs",
    "clip_score",
    "fid",
    "frechet_distance",
    "fsd",
    "load_clip",
    "load_probe",
    "roc_auc_score",
    "roc_curve",
    "tpr_at_fpr",
    "train_attribute_probe",
]

"""Evaluation: feature extraction, probes (linear, attentive, kNN, low-shot), collapse diagnostics."""
from .features import EvalTransform, Features, encode, extract, load, save
from .metrics import collapse_stats, effective_rank, feature_spread
from .probes import attentive_probe, knn_probe, linear_probe, lowshot, per_class, topk

__all__ = ["EvalTransform", "Features", "attentive_probe", "collapse_stats", "effective_rank", "encode", "extract",
           "feature_spread", "knn_probe", "linear_probe", "load", "lowshot", "per_class", "save", "topk"]

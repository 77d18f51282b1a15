"""Collapse diagnostics of a feature matrix [N, D]."""
from __future__ import annotations

import torch


def effective_rank(feats: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values, between
    1 (every feature the same direction) and min(N, D)."""
    s = torch.linalg.svdvals(feats.double())
    p = s / (s.sum() + eps) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def feature_spread(feats: torch.Tensor) -> dict:
    """Per-dimension standard deviation over the samples: its mean and minimum."""
    std = feats.double().std(0)
    return {"std_mean": float(std.mean()), "std_min": float(std.min())}


def collapse_stats(feats: torch.Tensor) -> dict:
    return {"rank": effective_rank(feats), **feature_spread(feats)}
